"""The non-weight files of a Hugging Face-format export, so vLLM and transformers serve the directory
unchanged: tokenizer.json + tokenizer_config.json (with a chat template), generation_config.json (the eos
ids generation stops at), `dtype` in config.json, and for a LLaVA the processor configs.

The model never owns a tokenizer (ARCHITECTURE.md); it only remembers where its files came from:
`omnilm.load(dir)` sets `model.export_source = dir` (training sets its tokenizer's directory), and a
fresh `omnilm.build(preset)` has none, so it exports the bundled tokenizer when the preset was made for
it (`tiny`: vocab 2048, bos/eos 1/2). `save_pretrained` copies the tokenizer from there; a model with no
known tokenizer is written without one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..tokenizers.text import ASSET_DIR, TextTokenizer, chat_template

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def tokenizer_config(tokenizer: TextTokenizer, base: dict | None = None) -> dict:
    """`base` (a source's tokenizer_config.json) completed with the chat template and the special tokens
    transformers' processors look up as attributes (`tokenizer.image_token`)."""
    out = dict(base) if base else tokenizer.hf_config()
    template = chat_template(tokenizer)
    if template is not None and not out.get("chat_template"):
        out["chat_template"] = template
    extra = out.get("extra_special_tokens")
    extra = dict(extra) if isinstance(extra, dict) else {}
    for name, tok_id in (
        ("image_token", tokenizer.image_token_id),
        ("audio_token", tokenizer.audio_token_id),
    ):
        if tok_id is not None:
            out.setdefault(name, tokenizer.id_to_token(tok_id))
            extra.setdefault(name, out[name])
    if extra:
        out["extra_special_tokens"] = extra
    return out


def default_tokenizer_fits(decoder_cfg) -> bool:
    """Whether a decoder was built for the bundled tokenizer (its vocab and special ids)."""
    tok = TextTokenizer.default()
    return (
        decoder_cfg.vocab_size == tok.vocab_size
        and decoder_cfg.bos_token_id == tok.bos_token_id
        and decoder_cfg.eos_token_id == tok.eos_token_id
    )


def tokenizer_source(model) -> Path | None:
    """The directory holding the tokenizer this model was loaded or built with: where it was loaded
    from, else (a fresh build) the bundled tokenizer when the preset was made for it."""
    if not hasattr(model, "export_source"):
        return ASSET_DIR if default_tokenizer_fits(model.config.decoder) else None
    src = model.export_source
    if src is not None and (Path(src) / "tokenizer.json").is_file():
        return Path(src)
    return None


def write_tokenizer(src: Path, out: Path, complete: bool = True) -> TextTokenizer:
    """Copy the tokenizer files from `src` and (complete) add what vLLM and transformers' processors
    need to its tokenizer_config.json: the chat template, the media tokens as extra_special_tokens."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
    tok = TextTokenizer.from_dir(out)
    if not complete:
        return tok
    cfg_file = out / "tokenizer_config.json"
    base = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    cfg = tokenizer_config(tok, base)
    if (out / "chat_template.jinja").is_file() and not (base or {}).get("chat_template"):
        cfg.pop("chat_template", None)  # transformers 5 keeps the template beside the config
    if cfg != base:  # a complete config stays byte for byte as it came
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return tok


def eos_ids(decoder_cfg, tokenizer: TextTokenizer | None) -> list[int]:
    """The ids generation stops at: the model's eos id(s), plus the end-of-turn token the chat template
    closes every message with (so a chat answer stops after one turn)."""
    ids = decoder_cfg.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None:
        for extra in (tokenizer.eos_token_id, tokenizer.eot_token_id):
            if extra is not None and extra < decoder_cfg.vocab_size and extra not in ids:
                ids.append(extra)
    return ids


def generation_config(decoder_cfg, tokenizer: TextTokenizer | None) -> dict:
    eos = eos_ids(decoder_cfg, tokenizer)
    out = {"bos_token_id": decoder_cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    if decoder_cfg.pad_token_id is not None:
        out["pad_token_id"] = decoder_cfg.pad_token_id
    return {k: v for k, v in out.items() if v is not None}


def write_export_files(model, path, hf_format: bool = True) -> None:
    """Everything but the weights and config.json's architecture fields: called by save_pretrained
    after it wrote config.json and the safetensors of a Hugging Face-format export. An OmniLM-format
    directory (hf_format False) gets its tokenizer only."""
    path = Path(path)
    src = tokenizer_source(model)
    if not hf_format:  # OmniLM's own format: its prompt format lives in processor_config.json
        if src is not None:
            write_tokenizer(src, path, complete=False)
        return
    cfg_file = path / "config.json"
    hf = json.loads(cfg_file.read_text())
    dtype = str(model.dtype).removeprefix("torch.")
    # transformers 5 reads `dtype`, transformers 4 and older vLLM releases `torch_dtype`
    hf["dtype"] = hf["torch_dtype"] = dtype
    cfg_file.write_text(json.dumps(hf, indent=2) + "\n")

    tok = write_tokenizer(src, path) if src is not None else None
    gen_src = src / "generation_config.json" if src is not None else None
    if gen_src is not None and gen_src.is_file():  # the source's own (it may hold sampling defaults)
        if gen_src.resolve() != (path / gen_src.name).resolve():
            shutil.copyfile(gen_src, path / "generation_config.json")
    else:
        gen = generation_config(model.config.decoder, tok)
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if model.hf_format == "llava" and tok is not None:
        write_processor_files(model, src, path, tok)
    elif src is not None and src.resolve() != path.resolve():  # e.g. Qwen2-Audio's feature extractor
        for name in PROCESSOR_FILES + ("audio_preprocessor_config.json", "chat_template.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, path / name)


def write_processor_files(model, src: Path, path: Path, tok: TextTokenizer) -> None:
    """preprocessor_config.json (the image processor transformers and vLLM run) and processor_config.json
    (OmniLM's placeholder count plus what transformers' LlavaProcessor reads)."""
    from ..processing.image import ImageProcessor

    v = model.config.vision
    pre_src = src / "preprocessor_config.json"
    if pre_src.is_file():
        pre = json.loads(pre_src.read_text())
    else:
        pre = ImageProcessor(size=(v.image_size, v.image_size)).to_dict()
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    if (src / "chat_template.json").is_file() and src.resolve() != path.resolve():  # a Hub processor's
        shutil.copyfile(src / "chat_template.json", path / "chat_template.json")
    meta_src = src / "processor_config.json"
    meta = json.loads(meta_src.read_text()) if meta_src.is_file() else {}
    meta.setdefault("tokens_per_image", v.tokens_per_image)
    meta.setdefault("image_token_id", model.config.image_token_id)
    meta.setdefault("prompt_format", "plain")
    # transformers' LlavaProcessor (which AutoProcessor and vLLM build from this file) expands one image
    # token into (image_size / patch_size)^2 + CLS - (1 if "default") copies: OmniLM's tokens_per_image
    meta.update(
        processor_class="LlavaProcessor",
        patch_size=v.patch_size,
        vision_feature_select_strategy=v.feature_select,
        num_additional_image_tokens=1 if v.kind == "clip" else 0,
        image_token=tok.id_to_token(model.config.image_token_id),
    )
    template = chat_template(tok)
    if template is not None:  # a processor reads its template from here, not from the tokenizer's
        meta.setdefault("chat_template", template)
    (path / "processor_config.json").write_text(json.dumps(meta, indent=2) + "\n")


def remember_source(model, path):
    """Record where a loaded model's files live (save_pretrained copies its tokenizer from there)."""
    model.export_source = Path(path)
    return model
