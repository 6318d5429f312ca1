"""Which converter reads or writes a model directory: the one place that knows every format.

`load` dispatches on omnilm_config.json (OmniLM's own format) or config.json's model_type;
`save_pretrained` on the config's hf_format (a function of the config alone).
"""

from __future__ import annotations

from ..errors import CheckpointError
from .emu3 import load_emu3, save_emu3
from .export import remember_source, write_export_files
from .hf import OMNILM_CONFIG, checkpoint_dir, load_llama, load_omnilm, read_config, save_llama, save_omnilm
from .qwen2 import load_qwen2, save_qwen2
from .qwen2_audio import load_qwen2_audio, save_qwen2_audio
from .vision import load_llava, save_llava


def load(path, device=None, dtype=None):
    # save_pretrained copies the tokenizer and processor files from where the model came (convert/export.py)
    return remember_source(_load(path, device, dtype), checkpoint_dir(path))


def save_pretrained(model, path):
    _save(model, path)
    # tokenizer, chat template, generation_config, dtype, processor configs (convert/export.py)
    write_export_files(model, path, hf_format=model.hf_format in HF_FORMATS)


HF_FORMATS = ("llama", "llava", "qwen2", "qwen2_audio", "emu3", "mllama")


def _load(path, device=None, dtype=None):
    path = checkpoint_dir(path)
    from ..quant.io import is_quantized_dir, load_quantized  # compressed-tensors directories

    if is_quantized_dir(path):
        return load_quantized(path, device, dtype)
    if (path / OMNILM_CONFIG).is_file():
        return load_omnilm(path, device, dtype)
    hf = read_config(path)
    model_type = hf.get("model_type")
    if model_type == "llama":
        return load_llama(path, hf, device, dtype)
    if model_type == "llava":
        return load_llava(path, hf, device, dtype)
    if model_type == "qwen2":
        return load_qwen2(path, hf, device, dtype)
    if model_type == "qwen2_audio":
        return load_qwen2_audio(path, hf, device, dtype)
    if model_type == "emu3":
        return load_emu3(path, hf, device, dtype)
    if model_type == "mllama":
        from .mllama import load_mllama

        return load_mllama(path, hf, device, dtype)
    raise CheckpointError(
        f"{path}/config.json: model_type {model_type!r} is not supported by omnilm.load "
        "(expected 'llama', 'llava' or an OmniLM checkpoint)"
    )


def _save(model, path):
    fmt = model.hf_format  # the config's, or a family model's own (Qwen2-Audio, Emu3)
    if fmt == "llama":
        return save_llama(model, path)
    if fmt == "llava":
        return save_llava(model, path)
    if fmt == "qwen2":
        return save_qwen2(model, path)
    if fmt == "qwen2_audio":
        return save_qwen2_audio(model, path)
    if fmt == "emu3":
        return save_emu3(model, path)
    if fmt == "mllama":
        from .mllama import save_mllama

        return save_mllama(model, path)
    return save_omnilm(model, path)
