"""`omnilm compose`: one multimodal checkpoint from separately pretrained parts.

A Llama decoder, a SigLIP/CLIP vision tower and a Whisper/wav2vec2 audio encoder keep their weights;
the projectors between them are fresh (the alignment stage of training fits them). The tokenizer gains
the `<|image|>` / `<|audio|>` markers if it lacks them, growing the embedding table by their rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import AddedToken

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tokenizers.text import AUDIO, IMAGE, TextTokenizer
from .export import remember_source, write_export_files
from .files import atomic_dir, carry, check_out_dir, require_tokenizer
from .hf import (
    checkpoint_dir,
    decoder_config_from_hf,
    init_empty_weights,
    llama_state_from_hf,
    load_strict,
    read_config,
    read_state_dict,
    retie,
)
from .hub import local_path
from .validate import read_json

# what the text model's directory holds besides its tokenizer.json (which the processor rewrites)
TEXT_SIDE_FILES = (
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _read_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _tokenizer_with_markers(tok_dir: Path, markers: list[str]) -> TextTokenizer:
    tok = TextTokenizer.from_dir(tok_dir)
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    missing = [m for m in markers if m not in vocab]
    if missing:
        tok._tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
        tok = TextTokenizer(tok._tok, {}, source=tok.source)
    return tok


def _grow_vocab(state: dict, cfg, new_size: int) -> dict:
    """New embedding (and head) rows start at the mean of the existing rows, a common, stable choice."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].shape[0] < new_size:
            w = state[key]
            extra = w.float().mean(0, keepdim=True).expand(new_size - w.shape[0], -1).to(w.dtype)
            state[key] = torch.cat([w, extra])
    cfg.vocab_size = new_size
    return state


def compose(text, vision=None, audio=None, out=None, seed: int = 0, tokenizer=None, overwrite: bool = False):
    """Write the composed checkpoint and its processor to `out`; returns the model.

    Parts are directories or hub ids. The tokenizer is the text model's (or `tokenizer`, a directory
    holding one); a text model without one is refused. `out` is written whole or not at all, and an
    existing non-empty `out` is refused unless `overwrite`."""
    from ..models.omni import OmniModel
    from ..processing.multimodal import Processor

    if out is not None:
        check_out_dir(out, overwrite)  # before any weights are read
    text_dir = checkpoint_dir(local_path(text))
    tok_dir = checkpoint_dir(local_path(tokenizer)) if tokenizer is not None else text_dir
    require_tokenizer(tok_dir, what="--tokenizer directory" if tokenizer is not None else "--text model")
    vision = checkpoint_dir(local_path(vision)) if vision is not None else None
    audio = checkpoint_dir(local_path(audio)) if audio is not None else None
    hf_text = read_config(text_dir)
    if hf_text.get("model_type") != "llama":
        raise CheckpointError(
            f"{text_dir}/config.json: --text must be a llama checkpoint, got {hf_text.get('model_type')!r}"
        )
    cfg = ModelConfig(decoder=decoder_config_from_hf(hf_text), source=f"composed from {text_dir}")
    lm_state = llama_state_from_hf(read_state_dict(text_dir), cfg.decoder)
    state = {}
    image_processor = audio_processor = None

    if vision is not None:
        from ..processing.image import ImageProcessor
        from .vision import tower_state_from_hf, vision_config_from_hf

        vision_dir = checkpoint_dir(vision)
        vcfg = vision_config_from_hf(read_config(vision_dir))
        # LLaVA's defaults: the penultimate layer's features; CLIP's CLS token dropped
        cfg.vision = dataclasses.replace(
            vcfg,
            use_head=False,
            feature_layer=-2,
            feature_select="default" if vcfg.kind == "clip" else "full",
        )
        raw = read_state_dict(vision_dir)
        raw = {
            k: v for k, v in raw.items() if not k.startswith("text_model.")
        }  # dual SigLIP/CLIP checkpoints
        tower = tower_state_from_hf(raw)
        state.update({"vision_tower." + k: v for k, v in tower.items() if not k.startswith("head.")})
        pre = _read_json(vision_dir / "preprocessor_config.json")
        image_processor = (
            ImageProcessor.from_dict(pre) if pre else ImageProcessor(size=(vcfg.image_size, vcfg.image_size))
        )

    if audio is not None:
        from ..processing.audio import AudioProcessor
        from .audio import audio_config_from_hf, audio_tower_state_from_hf

        audio_dir = checkpoint_dir(audio)
        hf_audio = read_config(audio_dir)
        cfg.audio = audio_config_from_hf(hf_audio)
        state.update(audio_tower_state_from_hf(read_state_dict(audio_dir), hf_audio))
        pre = _read_json(audio_dir / "preprocessor_config.json")
        audio_processor = (
            AudioProcessor.from_dict(pre, cfg.audio) if pre else AudioProcessor.from_config(cfg.audio)
        )

    markers = ([IMAGE] if vision is not None else []) + ([AUDIO] if audio is not None else [])
    tokenizer = _tokenizer_with_markers(tok_dir, markers)
    if tokenizer.vocab_size > cfg.decoder.vocab_size:
        lm_state = _grow_vocab(lm_state, cfg.decoder, tokenizer.vocab_size)
    cfg.image_token_id = tokenizer.image_token_id if vision is not None else None
    cfg.audio_token_id = tokenizer.audio_token_id if audio is not None else None

    with init_empty_weights():
        model = OmniModel(cfg)
    state.update({"language_model." + k: v for k, v in lm_state.items()})
    torch.manual_seed(seed)
    for name in ("multi_modal_projector", "audio_projector"):
        projector = getattr(model, name)
        if projector is not None:  # the only fresh weights: build them for real and initialize
            fresh = projector.to_empty(device="cpu")
            for m in fresh.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=cfg.decoder.initializer_range)
                    if m.bias is not None:
                        torch.nn.init.zeros_(m.bias)
            state.update({f"{name}.{k}": v for k, v in fresh.state_dict().items()})
    load_strict(model, state, source="composed model")
    retie(model)
    model.eval()

    if out is None:
        return model
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        carry(tok_dir, tmp, names=TEXT_SIDE_FILES)
        Processor.from_model_config(cfg, tokenizer, image_processor, audio_processor).save_pretrained(tmp)
        _keep_chat_template(tok_dir / "tokenizer_config.json", tmp / "tokenizer_config.json")
        # complete the tokenizer just written (OmniLM's chat template if it has none; the eos ids)
        write_export_files(remember_source(model, tmp), tmp, hf_format=model.hf_format != "omnilm")
    remember_source(model, out)
    return model


def _keep_chat_template(src: Path, dst: Path) -> None:
    """The processor writes its own tokenizer_config.json (with the new markers); the text model's chat
    template lives in its tokenizer_config.json and must survive."""
    template = (_read_json(src) or {}).get("chat_template")
    if template is not None and dst.is_file():
        config = json.loads(dst.read_text())
        config["chat_template"] = template  # over the default template the processor's tokenizer wrote
        dst.write_text(json.dumps(config, indent=2) + "\n")
