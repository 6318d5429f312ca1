"""The text decoder: a pre-norm decoder-only transformer (Llama family and the designs' presets).

Parameter names follow Hugging Face's LlamaForCausalLM (`model.layers.0.self_attn.q_proj.weight`,
`lm_head.weight`, ...) so a Llama checkpoint loads with an identity key map.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig
from .common.attention import SelfAttention, causal_mask
from .common.kv_cache import StaticCache
from .common.mlp import GeluMLP, SwiGLU
from .common.norms import make_norm
from .common.rope import rope_cos_sin, rope_inv_freq


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.self_attn = SelfAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias, cfg.qkv_bias
        )
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        else:
            self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, approximate="tanh")

    def forward(self, x, rope, mask, is_causal, cache=None, cache_position=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache, cache_position, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, blocks and final norm; returns hidden states (B, T, D)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        # not a state-dict entry: recomputed from the config on every build, as HF does
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        cache: StaticCache | None = None,
        cache_position=None,
        kv_len: int | None = None,
    ):
        """attention_mask: (B, S) 1 for real tokens (left padding allowed), or a boolean (B, 1, T, S)
        mask used as is (document masking for packed sequences). cache_position (T,): the cache
        slots the T new tokens go to; kv_len: how many cache slots are filled after this call."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        device = x.device
        if cache_position is None:
            cache_position = torch.arange(T, device=device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, cache_position, B)
        rope = rope_cos_sin(position_ids, self.inv_freq, x.dtype) if self.cfg.use_rope else None

        mask, is_causal = self_attention_mask(attention_mask, cache, cache_position, kv_len, T)
        window_mask = None
        if self.cfg.layer_types is not None and "sliding_attention" in self.cfg.layer_types:
            # the query slots: each row's positions unless a (B, S) mask left-pads rows (slots then differ
            # from positions, and HF's rule is by slot); the engine's rows each start at slot 0
            q_slots = (
                position_ids if attention_mask is None or attention_mask.dim() == 4 else cache_position[None]
            )
            window_mask = sliding_window_mask(
                mask, cache_position, q_slots, kv_len or T, self.cfg.sliding_window
            )
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if window_mask is not None and self.cfg.layer_types[i] == "sliding_attention":
                x = layer(x, rope, window_mask, False, layer_cache, cache_position, kv_len)
                continue
            x = layer(x, rope, mask, is_causal, layer_cache, cache_position, kv_len)
        return self.norm(x)


def sliding_window_mask(mask, cache_position, q_slots, kv_len: int, window: int):
    """The layer mask of a "sliding_attention" layer: `mask` (None: plain causal) and only keys whose slot
    is within `window` of the query's (HF's rule: key_slot > query_slot - window). q_slots (B or 1, T).
    -> (B or 1, 1, T, S)."""
    if mask is None:
        mask = causal_mask(cache_position, kv_len)
    k_slots = torch.arange(mask.shape[-1], device=cache_position.device)
    return mask & (k_slots[None, None, :] > q_slots[:, :, None] - window)[:, None]


def self_attention_mask(attention_mask, cache, cache_position, kv_len, T: int):
    """(mask, is_causal) for the self-attention of T new tokens: a (B, 1, T, S) boolean mask is used
    as is; no padding and no earlier cache entries (kv_len == T: a prefill into an empty cache) is
    plain causal attention, which lets SDPA pick its flash kernel; one new token over the kv_len
    filled slots sees all of them; anything else gets a causal mask over the cache slots."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool(), False
    if attention_mask is None and (cache is None or kv_len == T):
        return None, True
    if attention_mask is None and T == 1 and kv_len is not None:
        return None, False
    S = kv_len if kv_len is not None else (cache.max_len if cache is not None else T)
    return causal_mask(cache_position, S, attention_mask), False


def positions_from_mask(attention_mask, cache_position, batch):
    """RoPE positions: slot index without padding; with a (B, S) mask, the count of real tokens before
    each slot, so a left-padded row gets the positions it would have alone."""
    if attention_mask is None or attention_mask.dim() != 2:
        return cache_position[None].expand(batch, -1)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, S)
    return pos.clamp(min=0).index_select(1, cache_position)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class CausalLM(nn.Module):
    """Decoder plus output head; `model` and `lm_head` as in LlamaForCausalLM."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
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
    ):
        h = self.model(input_ids, inputs_embeds, attention_mask, position_ids, cache, cache_position, kv_len)
        if logits_slice is not None:  # prefill only needs the last position's logits
            h = h[:, logits_slice]
        return self.lm_head(h)

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> StaticCache:
        p = self.model.norm.weight  # never quantized, unlike the head
        return StaticCache(
            self.cfg.num_layers,
            batch,
            self.cfg.num_kv_heads,
            max_len,
            self.cfg.head_dim,
            dtype or p.dtype,
            device or p.device,
        )


def init_weights(module: nn.Module, std: float = 0.02):
    """Normal(0, std) for linear and embedding weights, zeros for biases, ones for norms; modules with
    a `reset_fixed_parameters()` method then restore their non-trained tables."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif (
            hasattr(m, "weight")
            and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 1
        ):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():  # fixed tables stored as weights (Whisper's sinusoids) are put back
        if hasattr(m, "reset_fixed_parameters"):
            m.reset_fixed_parameters()
