"""Llama-3.2-Vision (`model_type: mllama`) checkpoints: config map, key map, load and save.

Key layouts read (both map onto MllamaModel's names):
- the Hub layout (what transformers also writes): `language_model.model.*`, `language_model.lm_head.*`,
  `vision_model.*`, `multi_modal_projector.*` -- identical to OmniLM's names;
- transformers 5's runtime layout: `model.language_model.*`, `lm_head.*`, `model.vision_model.*`,
  `model.multi_modal_projector.*`.
The Hub layout is written back.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import CrossAttentionConfig, MllamaVisionConfig, ModelConfig
from ..errors import CheckpointError
from .hf import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    init_empty_weights,
    load_strict,
    read_state_dict,
    retie,
    write_state_dict,
)

RUNTIME_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
MLLAMA_EXTRA_EMBEDDINGS = 8  # embed_tokens has vocab_size + 8 rows in every Mllama checkpoint


def vision_config_from_hf(d: dict) -> MllamaVisionConfig:
    image_size, patch_size = d.get("image_size", 448), d.get("patch_size", 14)
    for name, v in (("image_size", image_size), ("patch_size", patch_size)):
        if not isinstance(v, int):
            raise CheckpointError(
                f"config.json: vision_config.{name} {v!r} must be one integer (square tiles)"
            )
    cfg = MllamaVisionConfig(
        hidden_size=d.get("hidden_size", 1280),
        intermediate_size=d.get("intermediate_size", 5120),
        num_layers=d.get("num_hidden_layers", 32),
        num_global_layers=d.get("num_global_layers", 8),
        num_heads=d.get("attention_heads", d.get("num_attention_heads", 16)),
        num_channels=d.get("num_channels", 3),
        image_size=image_size,
        patch_size=patch_size,
        norm_eps=d.get("norm_eps", 1e-5),
        hidden_act=d.get("hidden_act", "gelu"),
        max_num_tiles=d.get("max_num_tiles", 4),
        intermediate_layers_indices=d.get("intermediate_layers_indices") or [3, 7, 15, 23, 30],
        supported_aspect_ratios=d.get("supported_aspect_ratios"),
    )
    out_dim = d.get("vision_output_dim")
    if out_dim is not None and out_dim != cfg.output_dim:
        raise CheckpointError(
            f"config.json: vision_config.vision_output_dim {out_dim} != hidden_size x (1 + "
            f"{len(cfg.intermediate_layers_indices)} intermediate layers) = {cfg.output_dim}"
        )
    return cfg


def mllama_model_config(hf: dict, source: str = "") -> ModelConfig:
    text = dict(hf.get("text_config") or {})
    if not text:
        raise CheckpointError("config.json: model_type mllama needs a text_config")
    text.pop("head_dim", None)  # Mllama always uses hidden_size // num_attention_heads
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    text.setdefault("rms_norm_eps", 1e-5)
    decoder = decoder_config_from_hf(text)
    layers = text.get("cross_attention_layers")
    if layers is None:
        layers = [3, 8, 13, 18, 23, 28, 33, 38]
    ca = CrossAttentionConfig(
        layers=list(layers),
        vision=vision_config_from_hf(hf.get("vision_config") or {}),
        image_token_id=hf.get("image_token_index", hf.get("image_token_id", 128256)),
        extra_embeddings=MLLAMA_EXTRA_EMBEDDINGS,
    )
    return ModelConfig(decoder=decoder, cross_attention=ca, source=source)


def mllama_config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    ca, v = cfg.cross_attention, cfg.cross_attention.vision
    text = decoder_config_to_hf(cfg.decoder)
    for k in ("architectures", "head_dim", "attention_bias", "mlp_bias"):
        text.pop(k, None)
    text.update(model_type="mllama_text_model", cross_attention_layers=list(ca.layers), dtype=dtype)
    text.pop("torch_dtype", None)
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_global_layers": v.num_global_layers,
        "attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "norm_eps": v.norm_eps,
        "hidden_act": v.hidden_act,
        "max_num_tiles": v.max_num_tiles,
        "intermediate_layers_indices": list(v.intermediate_layers_indices),
        "supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
        "vision_output_dim": v.output_dim,
        "dtype": dtype,
    }
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": ca.image_token_id,
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
        "dtype": dtype,
    }


def mllama_state_from_hf(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for src, dst in RUNTIME_PREFIXES:
            if k.startswith(src):
                k = dst + k[len(src) :]
                break
        out[k] = v
    return out


def load_mllama(path, hf_config: dict, device=None, dtype=None):
    from ..models.mllama import MllamaModel

    cfg = mllama_model_config(hf_config, source=str(path))
    if cfg.cross_attention.extra_embeddings and cfg.decoder.tie_embeddings:
        raise CheckpointError(f"{path}/config.json: tied embeddings are not supported for mllama")
    with init_empty_weights():
        model = MllamaModel(cfg)
    load_strict(
        model, mllama_state_from_hf(read_state_dict(path)), source=str(path), dtype=dtype, device=device
    )
    retie(model)
    return model.eval()


def save_mllama(model, path):
    if not isinstance(model.config.cross_attention.vision, MllamaVisionConfig):
        from .hf import save_omnilm  # a composed SigLIP/CLIP + cross-attention model has no HF format

        return save_omnilm(model, path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(mllama_config_to_hf(model.config, dtype), indent=2))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("vision_tower.", "audio_"))}
    if model.config.decoder.tie_embeddings:
        state.pop("language_model.lm_head.weight", None)
    write_state_dict(state, path)


# ---- composition: a Llama plus a SigLIP/CLIP tower through fresh gated cross-attention layers --------


def cross_layer_indices(num_text_layers: int, every: int) -> list[int]:
    """A cross-attention layer after every `every` text layers: 4 layers, every 2 -> [2, 5] of 6."""
    n_cross = num_text_layers // every
    return [(k + 1) * every + k for k in range(n_cross)]


def compose_cross_attention(
    text, vision, every: int = 4, out=None, seed: int = 0, tokenizer=None, overwrite: bool = False
):
    """Insert freshly initialised gated cross-attention layers (gates at 0, so the composed model's
    logits equal the text model's until training moves them) and a fresh projector between a Llama
    and a SigLIP/CLIP tower. Written in OmniLM format (no Hugging Face format has this shape)."""
    import dataclasses

    import torch

    from ..errors import ConfigError
    from ..models.mllama import MllamaModel
    from ..tokenizers.text import IMAGE
    from .compose import _grow_vocab, _read_json, _tokenizer_with_markers
    from .files import atomic_dir, check_out_dir, require_tokenizer
    from .hf import checkpoint_dir, llama_state_from_hf, read_config
    from .hub import local_path
    from .vision import tower_state_from_hf
    from .vision import vision_config_from_hf as tower_config_from_hf

    if out is not None:
        check_out_dir(out, overwrite)  # before any weights are read
    text_dir, vision_dir = checkpoint_dir(local_path(text)), checkpoint_dir(local_path(vision))
    tok_dir = checkpoint_dir(local_path(tokenizer)) if tokenizer is not None else text_dir
    require_tokenizer(tok_dir, what="--tokenizer directory" if tokenizer is not None else "--text model")
    hf_text = read_config(text_dir)
    if hf_text.get("model_type") != "llama":
        raise CheckpointError(
            f"{text_dir}/config.json: --text must be a llama checkpoint, got {hf_text.get('model_type')!r}"
        )
    decoder = decoder_config_from_hf(hf_text)
    L = decoder.num_layers
    if every < 1 or every > L:
        raise ConfigError(f"--every {every}: must be between 1 and the text model's {L} layers")
    cross = cross_layer_indices(L, every)
    vcfg = tower_config_from_hf(read_config(vision_dir))
    vcfg = dataclasses.replace(  # LLaVA's choice: penultimate layer, CLIP's CLS dropped
        vcfg, use_head=False, feature_layer=-2, feature_select="default" if vcfg.kind == "clip" else "full"
    )
    tokenizer = _tokenizer_with_markers(tok_dir, [IMAGE])
    lm_state = llama_state_from_hf(read_state_dict(text_dir), decoder)
    if tokenizer.vocab_size > decoder.vocab_size:
        lm_state = _grow_vocab(lm_state, decoder, tokenizer.vocab_size)
    decoder = dataclasses.replace(decoder, num_layers=L + len(cross))
    ca = CrossAttentionConfig(layers=cross, vision=vcfg, image_token_id=tokenizer.image_token_id)
    cfg = ModelConfig(
        decoder=decoder, cross_attention=ca, source=f"composed from {text_dir} and {vision_dir}"
    )

    text_layers = [i for i in range(decoder.num_layers) if i not in cross]  # text layer j -> index
    state = {}
    for k, v in lm_state.items():
        if k.startswith("model.layers."):
            j, rest = k[len("model.layers.") :].split(".", 1)
            k = f"model.layers.{text_layers[int(j)]}.{rest}"
        state["language_model." + k] = v
    raw = {k: v for k, v in read_state_dict(vision_dir).items() if not k.startswith("text_model.")}
    state.update(
        {"vision_model." + k: v for k, v in tower_state_from_hf(raw).items() if not k.startswith("head.")}
    )
    with init_empty_weights():
        model = MllamaModel(cfg)
    torch.manual_seed(seed)
    fresh = [(f"language_model.model.layers.{i}", model.language_model.model.layers[i]) for i in cross]
    for prefix, module in fresh + [("multi_modal_projector", model.multi_modal_projector)]:
        module.to_empty(device="cpu")
        for name, p in module.named_parameters():
            with torch.no_grad():
                if name.endswith("_gate"):
                    p.zero_()  # tanh(0) = 0: the layer starts as the identity
                elif p.dim() == 1:
                    p.fill_(1.0) if name.endswith("norm.weight") else p.zero_()
                else:
                    p.normal_(0.0, decoder.initializer_range)
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    load_strict(model, state, source="composed model")
    retie(model)
    model.eval()
    if out is not None:
        with atomic_dir(out, overwrite) as tmp:  # written whole or not at all
            model.save_pretrained(tmp)
            tokenizer.save(tmp)
            pre = _read_json(vision_dir / "preprocessor_config.json")
            if pre is not None:
                (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return model
