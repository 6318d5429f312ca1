"""Hugging Face interop for the vision path: SigLIP / CLIP vision towers and LLaVA checkpoints.

Key layouts handled (all map to OmniModel's names by prefix):
- a bare tower (`siglip_vision_model`, `clip_vision_model`): `[vision_model.]embeddings.*`, `encoder.*`, ...
- a dual SigLIP / CLIP model: the `vision_model.*` half (text tower ignored)
- LLaVA, transformers 5 runtime layout: `model.language_model.*`, `model.vision_tower.*`,
  `model.multi_modal_projector.*`, `lm_head.*`
- LLaVA, the layout on the Hub (and what transformers still writes): `language_model.model.*`,
  `language_model.lm_head.*`, `vision_tower.[vision_model.]*`, `multi_modal_projector.*`; save_llava
  writes `vision_tower.vision_model.*`, the one vLLM loads
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig, VisionConfig
from ..errors import CheckpointError, ConfigError
from . import validate
from .hf import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    init_empty_weights,
    llama_state_from_hf,
    load_strict,
    read_state_dict,
    retie,
    write_state_dict,
)

TOWER_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
DUAL_TYPES = {"siglip": "siglip", "clip": "clip"}

# transformers' SiglipVisionConfig / CLIPVisionConfig defaults, for keys a config.json leaves out
_DEFAULTS = {
    "siglip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}


# ---- configs -------------------------------------------------------------------------------------------


def vision_config_from_hf(d: dict) -> VisionConfig:
    """A VisionConfig from a siglip_vision_model / clip_vision_model config, or from the vision_config of a
    siglip / clip / llava config (LLaVA's feature layer, selection and projector settings included)."""
    model_type = d.get("model_type")
    if model_type in DUAL_TYPES or model_type == "llava":
        if not isinstance(d.get("vision_config"), dict):
            raise CheckpointError(f"config.json: model_type {model_type!r} has no vision_config")
        vision = dict(d["vision_config"])
        # a siglip/clip dual config's vision_config may omit its own model_type
        vision.setdefault("model_type", f"{DUAL_TYPES.get(model_type, 'clip')}_vision_model")
        cfg = vision_config_from_hf(vision)
        if model_type == "llava":
            cfg = _with_llava_settings(cfg, d)
        return cfg
    if model_type not in TOWER_TYPES:
        raise CheckpointError(
            f"config.json: vision model_type {model_type!r} is not supported "
            f"(expected one of {sorted(TOWER_TYPES)})"
        )
    kind = TOWER_TYPES[model_type]
    v = {**_DEFAULTS[kind], **{k: x for k, x in d.items() if x is not None}}
    try:
        return VisionConfig(
            kind=kind,
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            num_channels=v["num_channels"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"],
            layer_norm_eps=v["layer_norm_eps"],
            hidden_act=v["hidden_act"],
            use_head=kind == "siglip" and v.get("vision_use_head", True),
            feature_layer=None,
            feature_select="full",
        )
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None


def _with_llava_settings(cfg: VisionConfig, d: dict) -> VisionConfig:
    import dataclasses

    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"config.json: projector_hidden_act {act!r} is not supported (expected 'gelu')")
    layer = d.get("vision_feature_layer", -2)
    select = d.get("vision_feature_select_strategy", "default")
    try:
        return dataclasses.replace(
            cfg,
            feature_layer=layer,
            feature_select=select,
            projector_bias=d.get("multimodal_projector_bias", True),
        )
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None


def vision_config_to_hf(cfg: VisionConfig) -> dict:
    """The vision_config block (siglip_vision_model / clip_vision_model) transformers reads back."""
    model_type = {v: k for k, v in TOWER_TYPES.items()}[cfg.kind]
    out = {
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
    }
    if cfg.kind == "siglip":
        out["vision_use_head"] = cfg.use_head
    return out


# ---- state dicts ----------------------------------------------------------------------------------------


def tower_state_from_hf(state: dict, prefix: str = "") -> dict:
    """Keys under `prefix` with that prefix and an optional `vision_model.` level stripped."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            k = k[len(prefix) :]
            out[k.removeprefix("vision_model.")] = v
    return out


def _has_head(state: dict, prefix: str = "") -> bool:
    return any(k.startswith(prefix + "head.") for k in state)


# ---- the tower alone ------------------------------------------------------------------------------------


def load_vision_encoder(path, hf_config: dict, device=None, dtype=None):
    """A SigLIP / CLIP vision tower from its Hugging Face directory; calling it on pixel_values (B, C, H, W)
    gives transformers' last_hidden_state (B, N, D)."""
    import dataclasses

    from ..models.vision import VisionTower

    with validate.config_errors(f"{path}/config.json"):
        cfg = vision_config_from_hf(hf_config)
    validate.check_config(cfg, f"{path}/config.json", lambda: VisionTower(cfg), dtype)
    if hf_config.get("model_type") == "llava":
        raise CheckpointError(f"{path}: a llava checkpoint is a whole model; load it with omnilm.load")
    cfg = dataclasses.replace(cfg, feature_layer=None, feature_select="full")
    raw = read_state_dict(path)
    if hf_config.get("model_type") in DUAL_TYPES:  # keep the vision half of a dual image-text model
        raw = {k: v for k, v in raw.items() if k.startswith("vision_model.")}
    state = tower_state_from_hf(raw)
    # the pooling head is optional: keep it when the checkpoint has it, so no key is left unplaced
    cfg = dataclasses.replace(cfg, use_head=cfg.kind == "siglip" and _has_head(state))
    with init_empty_weights():
        tower = VisionTower(cfg)
    load_strict(tower, state, source=str(path), dtype=dtype, device=device)
    return tower.eval()


# ---- LLaVA -------------------------------------------------------------------------------------------------

# transformers' LlamaConfig defaults
_LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

_NEW_LAYOUT = (  # transformers 5 runtime names -> OmniModel names (which are the Hub layout)
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def llava_state_to_omni(state: dict) -> dict:
    """Either LLaVA key layout -> OmniModel keys."""
    out = {}
    for k, v in state.items():
        for old, new in _NEW_LAYOUT:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        if k.startswith("vision_tower.vision_model."):
            k = "vision_tower." + k[len("vision_tower.vision_model.") :]
        out[k] = v
    return out


def llava_model_config(hf_config: dict, has_head: bool) -> ModelConfig:
    import dataclasses

    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError("config.json: llava config has no text_config")
    if text.get("model_type", "llama") != "llama":
        raise CheckpointError(
            f"config.json: llava text_config model_type {text.get('model_type')!r} is not supported "
            "(expected 'llama')"
        )
    # Hub LLaVA configs list only what differs from LlamaConfig's defaults (llava-1.5: vocab and context)
    text = {**_LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    # the tie flag of a composite model lives at the top level (transformers ties lm_head by it)
    text["tie_word_embeddings"] = hf_config.get("tie_word_embeddings", text["tie_word_embeddings"])
    vision = vision_config_from_hf(hf_config)
    vision = dataclasses.replace(vision, use_head=vision.kind == "siglip" and has_head)
    image_token_id = hf_config.get("image_token_id", hf_config.get("image_token_index"))
    if image_token_id is None:
        raise CheckpointError("config.json: llava config has no image_token_id / image_token_index")
    return ModelConfig(decoder=decoder_config_from_hf(text), vision=vision, image_token_id=image_token_id)


def load_llava(path, hf_config: dict, device=None, dtype=None):
    """An OmniModel from a Hugging Face `model_type: llava` directory (SigLIP or CLIP tower, Llama text)."""
    from ..models.omni import OmniModel

    state = llava_state_to_omni(read_state_dict(path))
    with validate.config_errors(f"{path}/config.json"):
        cfg = llava_model_config(hf_config, has_head=_has_head(state, "vision_tower."))
    validate.check_config(cfg, f"{path}/config.json", lambda: OmniModel(cfg), dtype)
    cfg.source = str(path)
    with init_empty_weights():
        model = OmniModel(cfg)
    lm_state = llama_state_from_hf(state, cfg.decoder, prefix="language_model.")
    state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
    state.update({"language_model." + k: v for k, v in lm_state.items()})
    load_strict(model, state, source=str(path), dtype=dtype, device=device)
    retie(model)
    return model.eval()


def save_llava(model, path):
    """config.json + safetensors in the Hub's LLaVA layout, which transformers 4 and 5 and vLLM load."""
    cfg = model.config
    v = cfg.vision
    if v.pixel_shuffle > 1 or v.feature_layer is None:
        raise CheckpointError(
            "this vision setup (pixel_shuffle > 1 or feature_layer None) has no LLaVA equivalent; "
            "save it in OmniLM format"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = decoder_config_to_hf(cfg.decoder)
    text.pop("architectures", None)
    text.pop("torch_dtype", None)
    hf = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision_config_to_hf(v),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": v.tokens_per_image,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": v.feature_select,
        "projector_hidden_act": v.projector_act,
        "multimodal_projector_bias": v.projector_bias,
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    state = dict(model.state_dict())
    if cfg.decoder.tie_embeddings:
        state.pop("language_model.lm_head.weight")
    write_state_dict(llava_state_to_hub(state), path)


def llava_state_to_hub(state: dict) -> dict:
    """OmniModel keys -> the Hub layout with the tower under `vision_tower.vision_model.*`: the names
    vLLM's LLaVA loader requires (transformers loads this and the flat tower layout alike)."""
    tower = "vision_tower."
    return {
        (tower + "vision_model." + k[len(tower) :] if k.startswith(tower) else k): v for k, v in state.items()
    }
