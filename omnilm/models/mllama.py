"""Llama-3.2-Vision (Mllama): a Llama decoder with gated cross-attention layers at configured
indices, fed by the tiled vision encoder through a linear projector.

Layout and names follow transformers' MllamaForConditionalGeneration in its Hub layout
(`language_model.model.layers.N`, `language_model.lm_head`, `vision_model.*`,
`multi_modal_projector.*`), so conversion is the identity. Layer N is a self-attention `Block`
(omnilm/models/decoder.py) unless N is in `cross_attention.layers`, where it is a
`CrossAttentionBlock`; only the self-attention layers have a KV cache. The image keys/values are
computed once per request and reused by every decode step: the generation engine asks for them with
`request_state(ids, **media)`, keeps them with the request and hands them back to each forward as
`request_states` (a static-cache caller keeps them in `MllamaCache.cross`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..config import CrossAttentionConfig, DecoderConfig, MllamaVisionConfig, ModelConfig
from ..errors import ConfigError
from .common.kv_cache import StaticCache
from .common.norms import make_norm
from .common.rope import rope_cos_sin, rope_inv_freq
from .cross_attention import (
    CrossAttentionBlock,
    CrossAttentionState,
    batch_states,
    cross_attention_masks,
    state_rows,
)
from .decoder import Block, CausalLMOutput, positions_from_mask, self_attention_mask
from .loss import next_token_loss
from .mllama_vision import MllamaVisionModel
from .omni import OmniModel
from .vision import build_vision_tower


class MllamaCache(StaticCache):
    """KV caches of the self-attention layers plus the requests' cross-attention state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross: CrossAttentionState | None = None

    def reset(self):
        super().reset()
        self.cross = None


class MllamaTextModel(nn.Module):
    """Embeddings, self- and cross-attention layers, final norm -> hidden states (B, T, D)."""

    def __init__(self, cfg: DecoderConfig, ca: CrossAttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.cross_layers = sorted(ca.layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size + ca.extra_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(cfg) if i in ca.layers else Block(cfg) for i in range(cfg.num_layers)
        )
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        # layer index -> its slot in the KV cache (self-attention layers only)
        self.cache_slot = {i: n for n, i in enumerate(i for i in range(cfg.num_layers) if i not in ca.layers)}
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        cache: MllamaCache | None = None,
        cache_position=None,
        kv_len: int | None = None,
        cross: CrossAttentionState | None = None,
    ):
        """As Decoder.forward; `cross` is the prompt's cross-attention state (prefill), else the
        cache's is used (decode). With neither, the cross-attention layers are skipped, as in
        transformers (a text-only prompt runs the text model alone)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        if cache_position is None:
            cache_position = torch.arange(T, device=x.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, cache_position, B)
        rope = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        if cross is None and cache is not None:
            cross = getattr(cache, "cross", None)  # MllamaCache; the engine passes states explicitly
        mask, is_causal = self_attention_mask(attention_mask, cache, cache_position, kv_len, T)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionBlock):
                if cross is not None:
                    k, v = cross.kv[i]
                    x = layer(x, k, v, cross)
                continue
            layer_cache = cache.layers[self.cache_slot[i]] if cache is not None else None
            x = layer(x, rope, mask, is_causal, layer_cache, cache_position, kv_len)
        return self.norm(x)


class MllamaTextLM(nn.Module):
    """Text model plus head; the `language_model` of the composite, called like CausalLM."""

    def __init__(self, cfg: DecoderConfig, ca: CrossAttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.model = MllamaTextModel(cfg, ca)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            if ca.extra_embeddings:
                raise ConfigError("tied embeddings need cross_attention.extra_embeddings == 0")
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        cache_position=None,
        kv_len=None,
        logits_slice: slice | None = None,
        cross: CrossAttentionState | None = None,
    ):
        h = self.model(
            input_ids, inputs_embeds, attention_mask, position_ids, cache, cache_position, kv_len, cross
        )
        if logits_slice is not None:
            h = h[:, logits_slice]
        return self.lm_head(h)

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> MllamaCache:
        p = self.model.norm.weight  # never quantized, unlike the head
        return MllamaCache(
            len(self.model.cache_slot),
            batch,
            self.cfg.num_kv_heads,
            max_len,
            self.cfg.head_dim,
            dtype or p.dtype,
            device or p.device,
        )


class MllamaModel(OmniModel):
    """The composite: `language_model` (MllamaTextLM), `vision_model`, `multi_modal_projector`.

    forward takes transformers' inputs: pixel_values (B, N_images, tiles, 3, H, W), aspect_ratio_ids
    (B, N_images), aspect_ratio_mask (B, N_images, tiles), cross_attention_mask (B, T, N_images, tiles).
    """

    def __init__(self, cfg: ModelConfig):
        ca = cfg.cross_attention
        if not isinstance(ca, CrossAttentionConfig):
            raise ConfigError("MllamaModel needs config.cross_attention (a CrossAttentionConfig)")
        if cfg.vision is not None or cfg.discrete is not None:
            raise ConfigError(
                "cross-attention fusion with placeholder vision or discrete modalities in one model "
                "is not supported yet"
            )
        if max(ca.layers) >= cfg.decoder.num_layers:
            raise ConfigError(
                f"cross_attention.layers {ca.layers} out of range for {cfg.decoder.num_layers} decoder layers"
            )
        super().__init__(cfg)
        self.language_model = MllamaTextLM(cfg.decoder, ca)
        if isinstance(ca.vision, MllamaVisionConfig):
            self.vision_model = MllamaVisionModel(ca.vision)
            width = ca.vision.output_dim
        else:  # a SigLIP/CLIP tower (`omnilm compose --fusion cross-attention`): one tile per image
            self.vision_model = build_vision_tower(ca.vision)
            width = ca.vision.feature_dim
        self.multi_modal_projector = nn.Linear(width, cfg.decoder.hidden_size, bias=True)
        self._decode_states: tuple = (
            (),
            None,
        )  # (weak refs to the rows' states, batched): reused while they stay

    @property
    def num_kv_layers(self) -> int:
        """Only the self-attention layers keep keys/values of the text."""
        return len(self.language_model.model.cache_slot)

    # ---- fusion -----------------------------------------------------------------------------------

    def embed(self, input_ids, pixel_values=None, input_features=None, **image_inputs):
        """Token embeddings (B, T, D): <|image|> is an ordinary token here; the images reach the
        decoder through cross-attention (request_state), not through the embeddings."""
        if input_features is not None:
            raise ConfigError("this model has no audio encoder, but audio inputs were given")
        return self.language_model.model.embed_tokens(input_ids)

    def request_state(
        self,
        input_ids,
        pixel_values=None,
        input_features=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
    ) -> CrossAttentionState | None:
        """A request's images through the vision encoder into every cross-attention layer's k/v and
        the mask rules of its prompt: once per request (the engine keeps it). None without images."""
        if input_features is not None:
            raise ConfigError("this model has no audio encoder, but audio inputs were given")
        if pixel_values is None:
            return None
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ConfigError(
                f"pixel_values: {pixel_values.shape[0]} rows for {input_ids.shape[0]} prompts; "
                "expected (B, N_images, ...), one row per prompt"
            )
        state = self.cross_attention_state(
            pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask
        )
        _check_mask_rows(state, input_ids.shape[1])
        return state

    def cross_attention_state(
        self, pixel_values, aspect_ratio_ids, aspect_ratio_mask=None, cross_attention_mask=None
    ) -> CrossAttentionState:
        """Vision encoder, projector and every cross-attention layer's k/v: once per request."""
        vision = self.config.cross_attention.vision
        if isinstance(vision, MllamaVisionConfig):
            check_image_inputs(
                vision, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask
            )
            B, N, tiles = pixel_values.shape[:3]
            if aspect_ratio_mask is None:
                aspect_ratio_mask = torch.ones(B, N, tiles, dtype=torch.long, device=pixel_values.device)
            feats = self.vision_model(
                pixel_values, aspect_ratio_ids, aspect_ratio_mask
            )  # (B, N, tiles, P, F)
            tokens_per_tile, valid = vision.num_patches, aspect_ratio_ids > 0
        else:  # pixel_values (B, N, [1,] C, H, W): one tile per image
            if pixel_values.dim() == 6 and pixel_values.shape[2] == 1:
                pixel_values = pixel_values[:, :, 0]
            if pixel_values.dim() != 5:
                raise ConfigError(
                    f"pixel_values: expected (B, N_images, C, H, W), got shape {tuple(pixel_values.shape)}"
                )
            B = pixel_values.shape[0]
            feats = self.vision_model(pixel_values.flatten(0, 1).to(self.dtype))  # (B * N, n, F)
            tokens_per_tile = feats.shape[1]
            valid = aspect_ratio_ids > 0 if aspect_ratio_ids is not None else None
        states = self.multi_modal_projector(feats).reshape(
            B, -1, self.config.decoder.hidden_size
        )  # (B, S, D)
        layers = self.language_model.model.layers
        kv = {i: layers[i].cross_attn.kv(states) for i in self.language_model.model.cross_layers}
        mask, attn_scale, mlp_scale = cross_attention_masks(cross_attention_mask, tokens_per_tile, valid)
        return CrossAttentionState(kv, mask, attn_scale, mlp_scale)

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
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
        cross_attention_state: CrossAttentionState | None = None,
        request_states: list | None = None,
    ):
        """request_states (from the engine): each row's request_state, in row order."""
        self._check_inputs(input_ids, attention_mask, None, input_features, inputs_embeds, cache)
        if input_features is not None:
            raise ConfigError("this model has no audio encoder, but audio inputs were given")
        state = cross_attention_state
        if pixel_values is not None:
            state = self.cross_attention_state(
                pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask
            )
            T = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
            _check_mask_rows(state, T)
        if isinstance(cache, MllamaCache):
            if state is not None or cache_position is None or int(cache_position[0]) == 0:
                # a prefill: decode steps see the prompt's last row of the mask rules
                cache.cross = None if state is None else state.last_row()
        elif request_states is not None and state is None:
            state = self._rows_state(request_states, inputs_embeds is not None, cache_position)
        logits = self.language_model(
            input_ids if inputs_embeds is None else None,
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            cache_position,
            kv_len,
            logits_slice,
            state,
        )
        loss = next_token_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def _rows_state(self, states: list, prefill: bool, cache_position) -> CrossAttentionState | None:
        """The batched cross-attention state of an engine forward's rows. A prefill (one request, or
        text-only prompts together) takes its tokens' rows of the mask rules; a decode step (one
        token per row) the rules of each prompt's last token, batched once and reused while the
        running requests stay the same."""
        if prefill:
            if len(states) == 1 and states[0] is not None:
                start, end = int(cache_position[0]), int(cache_position[-1]) + 1
                return state_rows(states[0], start, end)
            return batch_states([None] * len(states))  # None: no row has images
        held, batched = self._decode_states  # weak references: finished requests' states go
        same = len(held) == len(states) and all(
            (r is None and s is None) or (r is not None and s is not None and r() is s)
            for r, s in zip(held, states)
        )  # a dead reference is no match for a row without images
        if not same:
            batched = batch_states([None if s is None else s.last_row() for s in states])
            self._decode_states = (tuple(None if s is None else weakref.ref(s) for s in states), batched)
        return batched


def _check_mask_rows(state: CrossAttentionState, T: int):
    if state.mask is not None and state.mask.shape[2] != T:
        raise ConfigError(f"cross_attention_mask covers {state.mask.shape[2]} tokens but the prompt has {T}")


def check_image_inputs(vision, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask):
    """Shapes and ids of the image inputs, checked before the encoder runs (one-line ConfigErrors)."""
    if pixel_values.dim() != 6 or pixel_values.shape[3] != vision.num_channels:
        raise ConfigError(
            f"pixel_values: expected (B, N_images, tiles, {vision.num_channels}, H, W), got shape "
            f"{tuple(pixel_values.shape)}"
        )
    B, N, tiles = pixel_values.shape[:3]
    if tiles != vision.max_num_tiles:
        raise ConfigError(
            f"pixel_values have {tiles} tiles per image but the model takes max_num_tiles = "
            f"{vision.max_num_tiles} (padded)"
        )
    if pixel_values.shape[4:] != (vision.image_size, vision.image_size):
        raise ConfigError(
            f"pixel_values tiles are {tuple(pixel_values.shape[4:])} but the model's tile size is "
            f"{vision.image_size}x{vision.image_size}"
        )
    if aspect_ratio_ids is None:
        raise ConfigError("pixel_values need aspect_ratio_ids (B, N_images), as the processor gives")
    if tuple(aspect_ratio_ids.shape) != (B, N):
        raise ConfigError(f"aspect_ratio_ids: expected shape ({B}, {N}), got {tuple(aspect_ratio_ids.shape)}")
    bad = (aspect_ratio_ids < 0) | (aspect_ratio_ids > vision.max_aspect_ratio_id)
    if bool(bad.any()):
        raise ConfigError(
            f"aspect_ratio_ids {aspect_ratio_ids[bad].tolist()} outside the supported ids 0..{vision.max_aspect_ratio_id} "
            f"(aspect ratios {vision.supported_aspect_ratios})"
        )
    if aspect_ratio_mask is not None and tuple(aspect_ratio_mask.shape) != (B, N, tiles):
        raise ConfigError(
            f"aspect_ratio_mask: expected shape ({B}, {N}, {tiles}), got {tuple(aspect_ratio_mask.shape)}"
        )
    if cross_attention_mask is not None and (
        cross_attention_mask.dim() != 4
        or cross_attention_mask.shape[0] != B
        or tuple(cross_attention_mask.shape[2:]) != (N, tiles)
    ):
        raise ConfigError(
            f"cross_attention_mask: expected shape ({B}, T, {N}, {tiles}), got {tuple(cross_attention_mask.shape)}"
        )


# ---- training: what the alignment stage trains ------------------------------------------------------------


def alignment_parameters(model: MllamaModel) -> list[str]:
    """The alignment stage (Llama-3.2-Vision's recipe): only the cross-attention layers (their
    attention, MLP, norms and gates) and the projector train; the text model and the vision tower stay
    frozen. Sets requires_grad accordingly and returns the trainable parameter names."""
    cross = tuple(f"language_model.model.layers.{i}." for i in model.language_model.model.cross_layers)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(cross + ("multi_modal_projector.",)))
        if p.requires_grad:
            names.append(name)
    return names


def cross_attention_linears(model: MllamaModel, leaves=("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    """Module names of the cross-attention projections (LoRA targets: apply_lora(model, modules=...))."""
    return [
        f"language_model.model.layers.{i}.cross_attn.{leaf}"
        for i in model.language_model.model.cross_layers
        for leaf in leaves
    ]
