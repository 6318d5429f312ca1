"""Generation: prefill once, then one-token decode steps over a static KV cache.

Works on token ids and tensors only; tokenizers, stop strings and chat templates live above it.
"""

from __future__ import annotations

import torch

from ..errors import ContextLengthError
from .sampling import apply_repetition_penalty, sample


def _eos_ids(model, eos_token_id):
    if eos_token_id is None:
        eos_token_id = model.config.decoder.eos_token_id
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, device=model.device)


@torch.inference_mode()
def stream(
    model,
    input_ids,
    attention_mask=None,
    max_new_tokens=64,
    temperature=0.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    eos_token_id=None,
    seed=None,
    pixel_values=None,
    input_features=None,
    pad_token_id=None,
):
    """Yield the next token of every row, (B,), step by step. Finished rows yield the pad id."""
    device = model.device
    input_ids = input_ids.to(device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    ctx = model.config.decoder.max_seq_len
    if T >= ctx:
        raise ContextLengthError(
            f"prompt of {T} tokens does not fit the context of {ctx} tokens (one new token needs {T + 1})"
        )
    max_new_tokens = min(max_new_tokens, ctx - T)
    if max_new_tokens <= 0:
        return
    L = T + max_new_tokens
    mask = torch.ones(B, L, dtype=torch.long, device=device)  # (B, L): prompt padding, then new tokens
    if attention_mask is not None:
        mask[:, :T] = attention_mask.to(device)
    positions = mask[:, :T].cumsum(-1) - 1  # (B, T) positions of a left-padded row as if alone
    next_pos = positions[:, -1:] + 1  # (B, 1)
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.config.decoder.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    seen = None
    if repetition_penalty is not None and repetition_penalty != 1.0:
        V = model.config.decoder.vocab_size
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, True)

    cache = model.language_model.make_cache(B, L)
    logits = model(
        input_ids,
        attention_mask=mask,
        pixel_values=pixel_values,
        input_features=input_features,
        position_ids=positions.clamp(min=0),
        cache=cache,
        cache_position=torch.arange(T, device=device),
        kv_len=T,
        logits_slice=slice(-1, None),
    ).logits[:, -1]  # (B, V)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample(logits, temperature, top_k, top_p, min_p, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        yield token
        if eos is not None:
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                return
        if step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        slot = T + step
        logits = model.language_model(
            token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            cache=cache,
            cache_position=torch.tensor([slot], device=device),
            kv_len=slot + 1,
        )[:, -1]
        next_pos = next_pos + 1


def generate(model, input_ids, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens (B, T + n), like transformers' generate."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = list(stream(model, input_ids, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids.to(model.device), torch.stack(new, dim=1)], dim=1)
