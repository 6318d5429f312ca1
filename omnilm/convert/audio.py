"""Hugging Face audio encoders -> OmniLM: Whisper (encoder half only) and wav2vec2 directories.

The OmniLM modules use Hugging Face's leaf names, so conversion is a prefix map: `model.encoder.` /
`encoder.` for Whisper, `wav2vec2.` (task heads) or nothing (`Wav2Vec2Model`) for wav2vec2. The
Whisper decoder, the wav2vec2 pre-training and task heads are dropped on purpose and named in a
list; any other key that does not fit the encoder is an error.
"""

from __future__ import annotations

import torch

from ..config import AudioConfig
from ..errors import CheckpointError
from . import validate
from .hf import init_empty_weights, load_strict, read_config, read_state_dict

AUDIO_MODEL_TYPES = ("whisper", "wav2vec2")

# Keys outside the encoder that a wav2vec2 checkpoint may carry: the masked-frame embedding used only
# in pre-training, the quantizer and projections of Wav2Vec2ForPreTraining, and task heads.
_WAV2VEC2_DROPPED = (
    "masked_spec_embed",
    "quantizer.",
    "project_hid.",
    "project_q.",
    "lm_head.",
    "dropout_features",
    "projector.",
    "classifier.",
    "layer_weights",
)


def _activation(value, key: str) -> str:
    if value in ("gelu",):
        return "gelu"
    if value in ("gelu_new", "gelu_pytorch_tanh"):
        return "gelu_new"
    raise CheckpointError(f"config.json: {key} {value!r} is not supported (expected 'gelu' or 'gelu_new')")


def audio_config_from_hf(d: dict, projector_stack: int = 4) -> AudioConfig:
    """A Hugging Face `whisper` or `wav2vec2` config.json dict -> AudioConfig."""
    model_type = d.get("model_type")
    try:
        if model_type == "whisper":
            return AudioConfig(
                kind="whisper",
                hidden_size=d["d_model"],
                num_layers=d["encoder_layers"],
                num_heads=d["encoder_attention_heads"],
                intermediate_size=d["encoder_ffn_dim"],
                activation=_activation(d.get("activation_function", "gelu"), "activation_function"),
                num_mel_bins=d.get("num_mel_bins", 80),
                max_source_positions=d.get("max_source_positions", 1500),
                projector_stack=projector_stack,
            )
        if model_type == "wav2vec2":
            if d.get("add_adapter"):
                raise CheckpointError("config.json: wav2vec2 add_adapter=true is not supported")
            if d.get("feat_extract_activation", "gelu") != "gelu":
                raise CheckpointError(
                    f"config.json: feat_extract_activation {d['feat_extract_activation']!r} is not "
                    "supported (expected 'gelu')"
                )
            return AudioConfig(
                kind="wav2vec2",
                hidden_size=d["hidden_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=d["num_attention_heads"],
                intermediate_size=d["intermediate_size"],
                layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                activation=_activation(d.get("hidden_act", "gelu"), "hidden_act"),
                conv_dim=list(d["conv_dim"]),
                conv_kernel=list(d["conv_kernel"]),
                conv_stride=list(d["conv_stride"]),
                conv_bias=d.get("conv_bias", False),
                num_conv_pos_embeddings=d.get("num_conv_pos_embeddings", 128),
                num_conv_pos_embedding_groups=d.get("num_conv_pos_embedding_groups", 16),
                feat_extract_norm=d.get("feat_extract_norm", "group"),
                do_stable_layer_norm=d.get("do_stable_layer_norm", False),
                projector_stack=projector_stack,
            )
    except KeyError as e:
        raise CheckpointError(f"config.json: {model_type} config has no {e.args[0]!r}") from None
    raise CheckpointError(
        f"config.json: model_type {model_type!r} is not an audio encoder "
        f"(expected one of {', '.join(AUDIO_MODEL_TYPES)})"
    )


def encoder_state_from_hf(state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Hugging Face keys -> keys of the OmniLM encoder module (WhisperEncoder / Wav2Vec2Encoder)."""
    model_type = hf_config.get("model_type")
    out = {}
    if model_type == "whisper":
        # WhisperModel: encoder.*, decoder.*; WhisperForConditionalGeneration: model.encoder.*, proj_out
        for key, value in state.items():
            k = key.removeprefix("model.")
            if k.startswith("encoder."):
                out[k.removeprefix("encoder.")] = value
            elif not (k.startswith("decoder.") or k.startswith("proj_out.")):
                out[key] = value  # left in so load_strict names it as unexpected
        return out
    if model_type == "wav2vec2":
        for key, value in state.items():
            k = key.removeprefix("wav2vec2.")
            if k.startswith(_WAV2VEC2_DROPPED):
                continue
            # weight_norm as torch parametrizations (newer transformers) or as the old _g/_v pair
            k = k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
            k = k.replace("conv.parametrizations.weight.original1", "conv.weight_v")
            out[k] = value
        return out
    raise CheckpointError(
        f"model_type {model_type!r} is not an audio encoder (expected one of {', '.join(AUDIO_MODEL_TYPES)})"
    )


def audio_tower_state_from_hf(
    state: dict[str, torch.Tensor], hf_config: dict, prefix: str = "audio_tower."
) -> dict:
    """Hugging Face Whisper/wav2vec2 keys -> OmniModel keys (`audio_tower.*`), for composing a model."""
    return {prefix + k: v for k, v in encoder_state_from_hf(state, hf_config).items()}


def load_audio_encoder(
    path, hf_config: dict | None = None, device=None, dtype=None, projector_stack: int = 4
):
    """A Hugging Face whisper or wav2vec2 directory -> eval-mode encoder: input_features -> (B, N, D).

    Whisper: log-mel (B, n_mels, 3000) in; wav2vec2: waveform (B, samples) in. `.config` is the AudioConfig.
    """
    from ..models.audio import build_audio_tower

    hf_config = read_config(path) if hf_config is None else hf_config
    with validate.config_errors(f"{path}/config.json"):
        cfg = audio_config_from_hf(hf_config, projector_stack)
    validate.check_config(cfg, f"{path}/config.json", lambda: build_audio_tower(cfg), dtype)
    with init_empty_weights():
        encoder = build_audio_tower(cfg)
    state = encoder_state_from_hf(read_state_dict(path), hf_config)
    load_strict(encoder, state, source=str(path), dtype=dtype, device=device)
    return encoder.eval()
