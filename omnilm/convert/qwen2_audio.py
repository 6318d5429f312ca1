"""Hugging Face interop for Qwen2-Audio (`model_type: qwen2_audio`, Qwen2AudioForConditionalGeneration).

Key layouts (both map by prefix): what transformers writes and the Hub holds, `audio_tower.*`,
`multi_modal_projector.linear.*`, `language_model.model.*`, `language_model.lm_head.*`; and the
transformers 5 runtime names `model.audio_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.*`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import AudioConfig, ModelConfig
from ..errors import CheckpointError
from .hf import init_empty_weights, load_strict, read_state_dict, retie, write_state_dict
from .qwen2 import qwen2_decoder_config_from_hf, qwen2_decoder_config_to_hf

AUDIO_TOKEN_ID = 151646  # transformers' Qwen2AudioConfig.audio_token_index default

# transformers' Qwen2AudioEncoderConfig defaults (Whisper-large-v3 sized), for keys a config leaves out
_ENCODER_DEFAULTS = dict(
    num_mel_bins=128,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    d_model=1280,
    activation_function="gelu",
    max_source_positions=1500,
    scale_embedding=False,
)


def audio_config_from_hf(d: dict) -> AudioConfig:
    d = {**_ENCODER_DEFAULTS, **d}
    if d["scale_embedding"]:
        raise CheckpointError("config.json: audio_config.scale_embedding true is not supported")
    act = d["activation_function"]
    if act not in ("gelu", "gelu_new"):
        raise CheckpointError(f"config.json: audio_config.activation_function {act!r} is not supported")
    try:
        return AudioConfig(
            kind="qwen2_audio",
            hidden_size=d["d_model"],
            num_layers=d["encoder_layers"],
            num_heads=d["encoder_attention_heads"],
            intermediate_size=d["encoder_ffn_dim"],
            activation=act,
            num_mel_bins=d["num_mel_bins"],
            max_source_positions=d["max_source_positions"],
            projector_stack=1,
        )
    except ValueError as e:
        raise CheckpointError(f"config.json: audio_config: {e}") from None


def model_config_from_hf(d: dict, source: str = "") -> ModelConfig:
    for key in ("audio_config", "text_config"):
        if not isinstance(d.get(key), dict):
            raise CheckpointError(f"config.json: qwen2_audio needs a {key} object")
    decoder = qwen2_decoder_config_from_hf(
        {"tie_word_embeddings": d.get("tie_word_embeddings", False), **d["text_config"]}
    )
    audio = audio_config_from_hf(d["audio_config"])
    if audio.frames_per_window * 2 != audio.max_source_positions:
        raise CheckpointError(
            f"config.json: max_source_positions {audio.max_source_positions} does not match a 30 s window"
        )
    token = d.get("audio_token_index", d.get("audio_token_id", AUDIO_TOKEN_ID))
    if not 0 <= token < decoder.vocab_size:
        raise CheckpointError(f"config.json: audio_token_index {token} is outside the vocabulary")
    return ModelConfig(decoder=decoder, audio=audio, audio_token_id=token, source=source)


def model_config_to_hf(cfg: ModelConfig) -> dict:
    a = cfg.audio
    text = qwen2_decoder_config_to_hf(cfg.decoder)
    for k in ("architectures", "torch_dtype"):
        text.pop(k, None)
    return {
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "model_type": "qwen2_audio",
        "audio_token_index": cfg.audio_token_id,
        "audio_config": {
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": a.num_mel_bins,
            "encoder_layers": a.num_layers,
            "encoder_attention_heads": a.num_heads,
            "encoder_ffn_dim": a.intermediate_size,
            "d_model": a.hidden_size,
            "activation_function": a.activation,
            "max_source_positions": a.max_source_positions,
            "scale_embedding": False,
        },
        "text_config": text,
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
    }


def state_from_hf(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for old, new in (
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.audio_tower.", "audio_tower."),
            ("model.multi_modal_projector.", "audio_projector."),
            ("multi_modal_projector.", "audio_projector."),
        ):
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def load_qwen2_audio(path, hf_config: dict, device=None, dtype=None):
    from ..models.qwen2_audio import Qwen2AudioModel

    cfg = model_config_from_hf(hf_config, str(path))
    with init_empty_weights():
        model = Qwen2AudioModel(cfg)
    state = state_from_hf(read_state_dict(path))
    if cfg.decoder.tie_embeddings:
        state.setdefault(
            "language_model.lm_head.weight", state.get("language_model.model.embed_tokens.weight")
        )
    load_strict(model, state, source=str(path), dtype=dtype, device=device)
    retie(model)
    return model.eval()


def save_qwen2_audio(model, path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("audio_projector."):
            k = "multi_modal_projector." + k[len("audio_projector.") :]
        state[k] = v
    if model.config.decoder.tie_embeddings:
        state.pop("language_model.lm_head.weight")
    hf = model_config_to_hf(model.config)
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    write_state_dict(state, path)
