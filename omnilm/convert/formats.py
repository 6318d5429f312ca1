"""Which converter reads or writes a model directory: the one place that knows every format.

`load` dispatches on omnilm_config.json (OmniLM's own format) or config.json's model_type;
`save_pretrained` on the config's hf_format (a function of the config alone).
"""

from __future__ import annotations

from ..errors import CheckpointError
from .export import remember_source, write_export_files
from .hf import OMNILM_CONFIG, checkpoint_dir, load_llama, load_omnilm, read_config, save_llama, save_omnilm
from .vision import load_llava, save_llava


def load(path, device=None, dtype=None):
    path = checkpoint_dir(path)
    if (path / OMNILM_CONFIG).is_file():
        return remember_source(load_omnilm(path, device, dtype), path)
    hf = read_config(path)
    model_type = hf.get("model_type")
    if model_type == "llama":
        return remember_source(load_llama(path, hf, device, dtype), path)
    if model_type == "llava":
        return remember_source(load_llava(path, hf, device, dtype), path)
    raise CheckpointError(
        f"{path}/config.json: model_type {model_type!r} is not supported by omnilm.load "
        "(expected 'llama', 'llava' or an OmniLM checkpoint)"
    )


def save_pretrained(model, path):
    fmt = model.config.hf_format
    if fmt == "llama":
        save_llama(model, path)
    elif fmt == "llava":
        save_llava(model, path)
    else:
        save_omnilm(model, path)
    # tokenizer, chat template, generation_config, dtype, processor configs (convert/export.py)
    write_export_files(model, path, hf_format=fmt in ("llama", "llava"))
