"""The composite model: decoder + optional encoders and projectors + optional discrete modalities.
Continuous fusion scatters projected encoder features into the token embeddings at the placeholder
ids the processor put in the prompt; discrete fusion (`discrete`, omnilm/models/discrete.py) reads
and writes image/audio codes as tokens with their own tables and heads. Both can be on at once (a
SigLIP tower to understand images, VQ codes to generate them).

Submodule names follow LLaVA (`language_model`, `vision_tower`, `multi_modal_projector`) so its
checkpoints convert by prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..hooks import MODEL_METHODS
from .decoder import CausalLM, CausalLMOutput, init_weights
from .loss import next_token_loss


@dataclass
class OmniOutput(CausalLMOutput):
    losses: dict[str, torch.Tensor] | None = None  # per-modality losses of a discrete model


class OmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.language_model = CausalLM(cfg.decoder)
        self.vision_tower = self.multi_modal_projector = None
        self.audio_tower = self.audio_projector = None
        if cfg.vision is not None:
            from .vision import build_vision_projector, build_vision_tower

            self.vision_tower = build_vision_tower(cfg.vision)
            self.multi_modal_projector = build_vision_projector(cfg.vision, cfg.decoder.hidden_size)
        if cfg.audio is not None:
            from .audio import build_audio_projector, build_audio_tower

            self.audio_tower = build_audio_tower(cfg.audio)
            self.audio_projector = build_audio_projector(cfg.audio, cfg.decoder.hidden_size)
        self.discrete = None
        if cfg.discrete is not None:
            from .discrete import DiscreteModalities

            if cfg.discrete.text_vocab_size != cfg.decoder.vocab_size:
                raise ConfigError(
                    f"discrete.text_vocab_size {cfg.discrete.text_vocab_size} must equal decoder.vocab_size "
                    f"{cfg.decoder.vocab_size} (image codes start right after the text ids)"
                )
            self.discrete = DiscreteModalities(cfg.discrete, cfg.decoder.hidden_size)

    # ---- fusion -----------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_images, 3, H, W) -> (N_images, tokens_per_image, D)."""
        feats = self.vision_tower(pixel_values.to(self.dtype))
        return self.multi_modal_projector(feats)

    def audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """(N_windows, ...) -> (N_windows, tokens_per_window, D)."""
        feats = self.audio_tower(input_features.to(self.dtype))
        return self.audio_projector(feats)

    def embed(self, input_ids, pixel_values=None, input_features=None):
        """Token embeddings with encoder features scattered in at the placeholder positions (B, T, D)."""
        if self.discrete is not None:
            embeds = self.discrete.embed(input_ids, self.language_model.model.embed_tokens)
        else:
            embeds = self.language_model.model.embed_tokens(input_ids)
        for values, token_id, encode, name in (
            (pixel_values, self.config.image_token_id, self.image_features, "image"),
            (input_features, self.config.audio_token_id, self.audio_features, "audio"),
        ):
            if values is None:
                continue
            if (
                token_id is None
                or (name == "image" and self.vision_tower is None)
                or (name == "audio" and self.audio_tower is None)
            ):
                raise ConfigError(f"this model has no {name} encoder, but {name} inputs were given")
            embeds = scatter_features(embeds, input_ids, token_id, encode(values), name)
        return embeds

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        input_features=None,
        inputs_embeds=None,
        position_ids=None,
        labels=None,
        cache=None,
        cache_position=None,
        kv_len=None,
        logits_slice=None,
        logits_modality=None,
    ):
        """logits_modality (discrete models only): "text", "image" or "audio" computes that head alone."""
        self._check_inputs(input_ids, attention_mask, pixel_values, input_features, inputs_embeds, cache)
        if inputs_embeds is None and (
            pixel_values is not None or input_features is not None or self.discrete is not None
        ):
            inputs_embeds = self.embed(input_ids, pixel_values, input_features)
        if self.discrete is not None:
            return self._forward_discrete(
                inputs_embeds,
                attention_mask,
                position_ids,
                labels,
                cache,
                cache_position,
                kv_len,
                logits_slice,
                logits_modality,
            )
        logits = self.language_model(
            None if inputs_embeds is not None else input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            cache_position,
            kv_len,
            logits_slice,
        )
        loss = next_token_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def _check_inputs(self, input_ids, attention_mask, pixel_values, input_features, inputs_embeds, cache):
        """Wrong shapes or dtypes fail here, naming the argument, not deep inside a layer. Shapes and
        dtypes only (no value reads), so the check never syncs a GPU; decode steps do not come here."""
        given = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        given.update(input_features=input_features, inputs_embeds=inputs_embeds)
        for name, t in given.items():
            if t is not None and not isinstance(t, torch.Tensor):
                raise ConfigError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if input_ids is None and inputs_embeds is None:
            raise ConfigError("give input_ids (B, T) or inputs_embeds (B, T, D)")
        if inputs_embeds is None:
            _expect(input_ids, "input_ids", "(B, T) integer token ids", 2, integer=True)
            x = input_ids
        else:
            _expect(inputs_embeds, "inputs_embeds", f"(B, T, {self.config.decoder.hidden_size})", 3)
            x = inputs_embeds
        B, T = x.shape[:2]
        if attention_mask is not None:
            # (B, S) padding mask: S == T, or the cache length when continuing; (B, 1, T, S) used as is
            ok = attention_mask.dim() == 4 or (
                attention_mask.dim() == 2
                and attention_mask.shape[0] == B
                and (attention_mask.shape[1] == T if cache is None else attention_mask.shape[1] >= T)
            )
            _expect(attention_mask, "attention_mask", f"({B}, {T}) like input_ids", ok=ok)
        v, a = self.config.vision, self.config.audio
        if pixel_values is not None and v is not None:
            ok = pixel_values.shape[1:2] == (v.num_channels,)
            _expect(
                pixel_values, "pixel_values", f"(N, {v.num_channels}, H, W) floats", 4, floating=True, ok=ok
            )
        if input_features is not None and a is not None:
            if a.kind == "whisper":
                ok = input_features.shape[1:2] == (a.num_mel_bins,)
                expected = f"(N, {a.num_mel_bins}, frames) log-mel floats"
                _expect(input_features, "input_features", expected, 3, floating=True, ok=ok)
            else:
                _expect(input_features, "input_features", "(N, samples) waveform floats", 2, floating=True)

    def _forward_discrete(
        self,
        inputs_embeds,
        attention_mask,
        position_ids,
        labels,
        cache,
        cache_position,
        kv_len,
        logits_slice,
        logits_modality=None,
    ):
        """Decoder hidden states through every modality's head; loss by the target's modality."""
        lm = self.language_model
        h = lm.model(None, inputs_embeds, attention_mask, position_ids, cache, cache_position, kv_len)
        if logits_slice is not None:
            h = h[:, logits_slice]
        logits = self.discrete.logits(h, lm.lm_head, logits_modality)  # (B, T, V_text + V_image + V_audio)
        loss = losses = None
        if labels is not None:
            loss, losses = self.discrete.loss(logits, labels)
        return OmniOutput(logits=logits, loss=loss, losses=losses)

    # ---- conveniences of the public API --------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        # the final norm's weight: never quantized, unlike the head or the embeddings may be
        return self.language_model.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.norm.weight.device

    # generate/stream/save_pretrained run in the layers above (the engine, the converters), which
    # models/ does not import: omnilm/__init__.py registers them in omnilm/hooks.py.
    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, temperature=None, top_k=None,
                 top_p=None, eos_token_id=None, seed=None, pixel_values=None, input_features=None,
                 **settings):  # fmt: skip
        """Prompt plus new tokens (B, T + n), like transformers' generate (omnilm.generation.generate).
        None leaves a setting at GenerationConfig's default (64 new tokens, greedy) or at a passed
        `generation_config`'s; settings: the other GenerationConfig fields (min_p, repetition_penalty,
        guidance_scale, ...) and a family's inputs (aspect_ratio_ids, feature_attention_mask, ...)."""
        return _hook("generate")(
            self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, seed=seed,
            pixel_values=pixel_values, input_features=input_features, **settings,
        )  # fmt: skip

    def stream(self, input_ids, **settings):
        """Yield new tokens as (B,) tensors while they are produced."""
        return _hook("stream")(self, input_ids, **settings)

    def save_pretrained(self, path):
        """Hugging Face format where the model has one (config.hf_format), else OmniLM format."""
        return _hook("save_pretrained")(self, path)

    @property
    def hf_format(self) -> str:
        return self.config.hf_format

    def init_weights(self):
        init_weights(self, self.config.decoder.initializer_range)
        return self


def _hook(name: str):
    return MODEL_METHODS[name]


def _expect(x, name, expected, ndim=None, integer=False, floating=False, ok=True):
    ok = ok and (ndim is None or x.dim() == ndim)
    ok = ok and (not integer or not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool))
    ok = ok and (not floating or x.is_floating_point())
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got shape {tuple(x.shape)} of {x.dtype}")


def scatter_features(embeds, input_ids, token_id, features, name="image"):
    """Put features (N, n, D) in order into embeds (B, T, D) where input_ids == token_id.

    The placeholders of all rows, read row-major, must number exactly N * n; image k's n features go
    to the k-th run of n placeholders. Checked before anything is written.
    """
    positions = input_ids == token_id  # (B, T)
    n_slots = int(positions.sum())
    n_feats = features.shape[0] * features.shape[1]
    if n_slots != n_feats:
        raise ConfigError(
            f"{n_slots} {name} placeholder tokens in the prompt but the {name} inputs give "
            f"{features.shape[0]} x {features.shape[1]} = {n_feats} features"
        )
    out = embeds.clone()
    out[positions] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return out
