"""Model methods implemented above models/: the public API's model.generate, model.stream and
model.save_pretrained run the engine and the converters, which models/ may not import. This table
(a leaf module, like errors.py) is filled by omnilm/__init__.py and read by models/omni.py."""

MODEL_METHODS: dict = {}  # "generate" | "stream" | "save_pretrained" -> function(model, ...)
