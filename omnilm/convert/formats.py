"""Which converter reads or writes a model directory: the one place that knows every format.

`load` dispatches on omnilm_config.json (OmniLM's own format) or config.json's model_type;
`save_pretrained` on the config's hf_format (a function of the config alone).
"""

from __future__ import annotations

from ..errors import CheckpointError
from .hf import OMNILM_CONFIG, checkpoint_dir, load_llama, load_omnilm, read_config, save_llama, save_omnilm
from .vision import load_llava, save_llava


def load(path, device=None, dtype=None):
    path = checkpoint_dir(path)
    if (path / OMNILM_CONFIG).is_file():
        return load_omnilm(path, device, dtype)
    hf = read_config(path)
    model_type = hf.get("model_type")
    if model_type == "llama":
        return load_llama(path, hf, device, dtype)
    if model_type == "llava":
        return load_llava(path, hf, device, dtype)
    raise CheckpointError(
        f"{path}/config.json: model_type {model_type!r} is not supported by omnilm.load "
        "(expected 'llama', 'llava' or an OmniLM checkpoint)"
    )


def save_pretrained(model, path):
    fmt = model.config.hf_format
    if fmt == "llama":
        return save_llama(model, path)
    if fmt == "llava":
        return save_llava(model, path)
    return save_omnilm(model, path)
