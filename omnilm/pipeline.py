"""Pipeline: a checkpoint's model, processor and generation defaults, read once, over the one engine.

    pipe = omnilm.Pipeline.from_pretrained("demo")
    out = pipe("which digit is this?", images=["digit.png"])       # out.text, out.images, out.audio
    for piece in pipe.stream("tell me a story"): print(piece, end="")
    req = pipe.submit(messages, config=GenerationConfig(...))      # into the continuous-batching engine

A prompt is a string (the processor's prompt format applies: plain text, or a user turn of the chat
format when the checkpoint was trained on chats) or a list of chat messages. The processor is
loaded first and the weights only when generation starts, so bad inputs are refused before the
model loads. Text (detokenizing, stop strings) lives here; the engine sees token ids only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, OmniLMError
from .generation.config import GenerationConfig
from .generation.text import TextStream
from .tokenizers.chat import find_chat_template


@dataclass
class Prompt:
    """An encoded prompt: token ids and the media tensors of its placeholders."""

    ids: list[int]
    media: dict = field(default_factory=dict)


@dataclass
class Output:
    text: str
    token_ids: list[int]  # the new tokens (eos included when it ended the generation)
    finish_reason: str | None
    images: list = field(default_factory=list)  # PIL images of generated image spans
    audio: list = field(default_factory=list)  # (waveform, sample_rate) of generated audio spans


class TextRequest:
    """An engine request seen as text: `pieces()` yields text as it is generated, `result()` waits
    for the whole Output. Stop strings end the request (its KV pages are freed at once)."""

    def __init__(self, pipeline, prompt: Prompt, config: GenerationConfig, on_text=None):
        self.pipeline, self.prompt, self.config = pipeline, prompt, config
        self.on_text = on_text
        self.stream = TextStream(pipeline.processor.tokenizer, config.stop_strings)
        self.eos = set(pipeline.eos_ids(config))
        self.request = None  # set by submit

    def _on_event(self, ev):
        if ev.token is None or ev.token in self.eos:
            piece = self.stream.finish() if ev.finish_reason else ""
        else:
            piece = self.stream.push(ev.token)
            if self.stream.stopped:
                self.request.cancel("stop")
            elif ev.finish_reason:
                piece += self.stream.finish()
        ev.text = piece
        if self.on_text is not None:
            self.on_text(ev)

    def events(self):
        """The engine events, each with `.text` (the new piece of text, possibly empty)."""
        return self.request.events()

    def pieces(self):
        for ev in self.events():
            if ev.error is not None:
                raise ev.error
            if ev.text:
                yield ev.text

    def cancel(self):
        self.request.cancel()

    def result(self) -> Output:
        for _ in self.pieces():
            pass
        ids = list(self.request.output)
        images, audio = self.pipeline.decode_media(self.prompt.ids + ids)
        reason = self.request.finish_reason
        return Output(self.stream.text, ids, reason, images, audio)


class Pipeline:
    def __init__(self, processor, model=None, generation_config: GenerationConfig | None = None,
                 model_dir: Path | None = None, device=None, dtype=None, max_batch: int = 16, max_queue: int = 64):  # fmt: skip
        self.processor = processor
        self._model = model
        self.model_dir = model_dir
        self.generation_config = generation_config or GenerationConfig()
        self._device, self._dtype = device, dtype
        self.max_batch, self.max_queue = max_batch, max_queue
        self._engine = None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, tokenizer=None, **engine_settings) -> Pipeline:
        """The processor now; the model when first needed. path: a model directory or 'demo'."""
        from .api import load_processor, resolve
        from .convert.hf import checkpoint_dir

        model_dir = checkpoint_dir(resolve(path))
        processor = load_processor(model_dir, tokenizer=tokenizer)
        return cls(processor, None, default_generation_config(model_dir, processor), model_dir, device, dtype,
                   **engine_settings)  # fmt: skip

    # ---- model and engine ------------------------------------------------------------------------------

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                from .api import load

                self._model = load(self.model_dir, device=self._device, dtype=self._dtype)
        return self._model

    @property
    def engine(self):
        """The continuous-batching engine, started in a background thread on first use."""
        from .generation.engine import Engine

        model = self.model
        with self._lock:
            if self._engine is None:
                self._engine = Engine(
                    model, max_batch=self.max_batch, max_queue=self.max_queue, prefix_caching=True
                )
                self._engine.start()
        return self._engine

    def close(self):
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    # ---- prompts -----------------------------------------------------------------------------------------

    def encode(
        self, prompt, images=None, audio=None, files=None, add_generation_prompt: bool = True
    ) -> Prompt:
        """A string or chat messages plus media -> token ids and media tensors (refused here when bad)."""
        proc = self.processor
        images, audio, files = list(images or []), list(audio or []), list(files or [])
        if isinstance(prompt, str) and proc.prompt_format == "chat":
            parts = [{"type": "image"} for _ in images] + [{"type": "audio"} for _ in audio]
            parts += [{"type": "file", "file": f} for f in files] + [{"type": "text", "text": prompt}]
            prompt, files = [{"role": "user", "content": parts}], []
        if isinstance(prompt, str):
            batch = proc(text=prompt, images=images or None, audio=audio or None, files=files or None)
        else:
            batch = proc(messages=prompt, images=images or None, audio=audio or None)
        return prompt_of(batch)

    def encode_chat(self, messages: list[dict]) -> Prompt:
        """Chat messages whose parts carry their media (bytes or paths) -> a Prompt, rendered as the
        server renders them: the checkpoint's chat template, else its plain prompt format."""
        return prompt_of(render_messages(self.processor, messages))

    def eos_ids(self, config: GenerationConfig) -> list[int]:
        eos = config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def config(self, config: GenerationConfig | None = None, **settings) -> GenerationConfig:
        return (config or self.generation_config).updated(**settings)

    # ---- generation --------------------------------------------------------------------------------------

    def submit(
        self, prompt, images=None, audio=None, files=None, config=None, on_text=None, **settings
    ) -> TextRequest:
        """Put a request into the engine; raises QueueFullError / ContextLengthError at once."""
        encoded = prompt if isinstance(prompt, Prompt) else self.encode(prompt, images, audio, files)
        req = TextRequest(self, encoded, self.config(config, **settings), on_text)
        req.request = self.engine.submit(encoded.ids, req.config, encoded.media, on_event=req._on_event)
        return req

    def stream(self, prompt, images=None, audio=None, files=None, config=None, **settings):
        """Yield the text of the answer piece by piece."""
        req = self.submit(prompt, images, audio, files, config, **settings)
        try:
            yield from req.pieces()
        finally:
            req.cancel()

    def __call__(self, prompt, images=None, audio=None, files=None, config=None, **settings) -> Output:
        return self.submit(prompt, images, audio, files, config, **settings).result()

    def decode_media(self, ids: list[int]):
        """(images, audio) of the complete image/audio spans in ids (discrete models only)."""
        if self._model is None or self._model.config.discrete is None:
            return [], []
        from .processing.media_out import decode_media

        return decode_media(self._model, ids, model_dir=self.model_dir)


def default_generation_config(model_dir: Path, processor) -> GenerationConfig:
    """Stop ids from generation_config.json when the checkpoint has one, else the tokenizer's end
    tokens; sampling defaults from generation_config.json."""
    tok = processor.tokenizer
    eos = [i for i in (tok.eos_token_id, tok.eot_token_id) if i is not None]
    settings = {}
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        from .convert.validate import read_json

        hf = read_json(path, error=OmniLMError)  # bounded: deep nesting or a non-object is an error too
        if isinstance(hf.get("eos_token_id"), (int, list)):
            eos = hf["eos_token_id"]
        if hf.get("do_sample"):  # transformers ignores the sampling settings without it
            for key in ("temperature", "top_k", "top_p", "min_p"):
                if isinstance(hf.get(key), (int, float)):
                    settings[key] = hf[key]
        if isinstance(hf.get("repetition_penalty"), (int, float)):
            settings["repetition_penalty"] = hf["repetition_penalty"]
    return GenerationConfig(eos_token_id=eos, **settings)


def render_messages(processor, messages: list[dict]) -> dict:
    """The processor batch (input_ids (1, T), pixel_values, input_features) for chat messages whose
    parts carry their media ({"type": "image", "image": bytes or path}, "audio", "file"): the one
    renderer of the server, `omnilm chat` and `omnilm generate --chat` (Pipeline.encode_chat)."""
    # a family processor that renders chats itself (Qwen2-Audio's ChatML; Mllama's, as training does)
    own_chat = getattr(processor, "renders_chats", False)
    if processor.prompt_format == "chat" or own_chat or find_chat_template(processor.tokenizer) is not None:
        parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
        images = [p["image"] for p in parts if p["type"] == "image"]
        audio = [p["audio"] for p in parts if p["type"] == "audio"]
        # sources go through images=/audio= so the processor applies its limits in one place
        stripped = [
            {
                **m,
                "content": [
                    {"type": p["type"]} if p["type"] in ("image", "audio") else p for p in m["content"]
                ],
            }
            if isinstance(m["content"], list)
            else m
            for m in messages
        ]
        return processor(messages=stripped, images=images or None, audio=audio or None)
    # A plain-format checkpoint was trained on single prompts: the system text and the last user
    # message make the prompt, as `omnilm generate --prompt` would give it.
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ConfigError("the messages hold no user message")
    texts, images, audio, files = [], [], [], []
    for i, m in enumerate(messages):
        if i != last_user and m["role"] != "system":
            continue
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            if p["type"] == "text":
                texts.append(p["text"])
            else:
                {"image": images, "audio": audio, "file": files}[p["type"]].append(p[p["type"]])
    return processor(text="\n\n".join(texts), images=images or None, audio=audio or None, files=files or None)


def prompt_of(batch) -> Prompt:
    """A processor batch (one row) -> the token ids and the media tensors the model takes."""
    keys = ("pixel_values", "input_features", "feature_attention_mask", "image_sizes")  # + family inputs
    keys += ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")  # mllama
    media = {k: batch[k] for k in keys if batch.get(k) is not None}
    return Prompt(batch["input_ids"][0].tolist(), media)
