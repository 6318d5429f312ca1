"""Generation: prefill once, then one-token decode steps over a static KV cache.

Works on token ids and tensors only; tokenizers and stop strings live a layer above (text.py).

Where the speed comes from:
- CPU (eager by default, under inference_mode): a decode step attends only to the filled cache
  slots (`kv_len`) and, when the batch has no padding, needs no mask at all; positions and cache
  slots are views into tables built once before the loop, so the loop allocates only what the
  model computes. `compile=True` compiles the step with inductor (frozen weights, C++ wrapper).
- CUDA: the decode step is compiled with `torch.compile(mode="reduce-overhead")`, i.e. replayed as
  a CUDA graph. That needs fixed shapes, so the compiled step attends over the whole static cache
  with a full-length mask (slots past the current one are hidden by its causal part), and the cache
  buffers are marked static and reused across calls of the same shape. The loop never reads a
  device value on the host except the all-rows-finished check every `sync_every` steps.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import ContextLengthError, OmniLMError
from .sampling import apply_repetition_penalty, sample

# A compiled step sees a cache length rounded up to a multiple of this, so generate calls of
# similar length reuse one compiled graph instead of recompiling for every prompt length.
COMPILED_LEN_MULTIPLE = 256
# On CUDA, how many steps pass between host reads of "all rows finished" (each read is a sync).
CUDA_SYNC_EVERY = 16


def _decode_step(lm, cache, token, position_ids, slot, key_valid, kv_len):
    """Logits (B, V) for one new token per row: token, position_ids (B, 1); slot (1,) its cache slot."""
    logits = lm(
        token,
        attention_mask=key_valid,
        position_ids=position_ids,
        cache=cache,
        cache_position=slot,
        kv_len=kv_len,
    )
    return logits[:, -1]


_compiled_steps: dict[str, tuple] = {}


def _weights_version(lm) -> int | None:
    """Changes whenever a parameter is modified in place (an optimizer step, a LoRA merge)."""
    try:
        return sum(p._version for p in lm.parameters())
    except RuntimeError:  # parameters created under inference_mode carry no version counter
        return None


def compiled_decode_step(lm, device_type: str):
    """`_decode_step` under torch.compile.

    CUDA: mode="reduce-overhead", i.e. CUDA graphs. CPU: inductor with freezing (weights folded in
    as constants, so inductor may prepack them for its kernels) and a C++ wrapper, which removes most of the
    per-op Python overhead of a small model; since frozen weights are copies, the step is compiled
    again when the parameters were modified in place since.
    """
    key = None if device_type == "cuda" else (id(lm), _weights_version(lm))
    if device_type not in _compiled_steps or _compiled_steps[device_type][1] != key:
        if device_type == "cuda":
            fn = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        else:
            options = {"freezing": True, "cpp_wrapper": True}
            fn = torch.compile(_decode_step, fullgraph=True, dynamic=False, options=options)
        _compiled_steps[device_type] = (fn, key)
    return _compiled_steps[device_type][0]


# One idle cache per model for the compiled path: a CUDA graph records buffer addresses, so reusing
# the same cache lets later calls of the same shape replay the graph instead of recording a new one.
# A cache is taken out while a generation runs, so two concurrent streams never share one.
_idle_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _take_cache(lm, batch: int, length: int, keep: bool):
    cache = _idle_caches.pop(lm, None) if keep else None
    if cache is None or cache.layers[0].k.shape[0] != batch or cache.max_len != length:
        cache = lm.make_cache(batch, length)
        if keep and cache.layers[0].k.is_cuda:  # tells CUDA graphs the buffers never move
            for layer in cache.layers:
                torch._dynamo.mark_static_address(layer.k)
                torch._dynamo.mark_static_address(layer.v)
    return cache


def _eos_tensor(model, eos_token_id):
    if eos_token_id is None:
        eos_token_id = model.config.decoder.eos_token_id
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=model.device) if ids else None


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    return input_ids[None] if input_ids.dim() == 1 else input_ids


@torch.inference_mode()
def _steps(
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
    pad_token_id=None,
    seed=None,
    pixel_values=None,
    input_features=None,
    compile=None,
    sync_every=None,
):
    """Yield (token (B,), finished (B,) bool) per step; the generation loop behind stream/generate.

    attention_mask (B, T): 1 for real tokens, left padding only. eos_token_id: an id, a list of ids,
    or [] for none (None: the model config's). Rows that finished yield pad_token_id (None: the
    config's, else the first eos id, else 0). compile: compile the decode step (None: on CUDA only).
    sync_every: steps between checks that every row finished (None: 1 on CPU, 16 on CUDA, so a
    CUDA stream may yield up to 15 all-padding steps after the last row finished).
    """
    lm = model.language_model
    device = model.device
    input_ids = _as_batch(input_ids).to(device)
    B, T = input_ids.shape
    ctx = model.config.decoder.max_seq_len
    if T >= ctx:
        raise ContextLengthError(
            f"prompt of {T} tokens does not fit the context of {ctx} tokens (one new token needs {T + 1})"
        )
    n_new = min(max_new_tokens, ctx - T)
    if n_new <= 0:
        return
    if compile is None:
        compile = device.type == "cuda"
    if sync_every is None:
        sync_every = CUDA_SYNC_EVERY if device.type == "cuda" else 1
    length = T + n_new
    if compile:
        length = min(-(-length // COMPILED_LEN_MULTIPLE) * COMPILED_LEN_MULTIPLE, ctx)

    # Padding is read once, before the loop (a host read of a device value).
    padded = attention_mask is not None and not bool(attention_mask.all())
    key_valid = torch.ones(B, length, dtype=torch.bool, device=device)  # (B, L) False at prompt padding
    if padded:
        attention_mask = attention_mask.to(device).bool()
        if not bool(attention_mask[:, -1].all()):
            raise OmniLMError("generation needs left padding: every row's last prompt token must be real")
        key_valid[:, :T] = attention_mask
    # A left-padded row gets the positions it would have alone; new token j of a row follows its
    # last real prompt token.
    prompt_pos = (key_valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    new_pos = prompt_pos[:, -1:] + 1 + torch.arange(n_new, device=device)  # (B, n_new)
    slots = torch.arange(length, device=device)  # (L,) cache slots; a step takes a view of one

    eos = _eos_tensor(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.config.decoder.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    seen = None
    if repetition_penalty is not None and repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.decoder.vocab_size, dtype=torch.bool, device=device)  # (B, V)
        seen.scatter_(1, input_ids, True)

    cache = _take_cache(lm, B, length, keep=compile)
    try:
        logits = model(
            input_ids,
            attention_mask=key_valid[:, :T] if padded else None,
            pixel_values=pixel_values,
            input_features=input_features,
            position_ids=prompt_pos,
            cache=cache,
            cache_position=slots[:T],
            kv_len=T,
            logits_slice=slice(-1, None),  # only the last position's logits are needed
        ).logits[:, -1]  # (B, V)
        step = compiled_decode_step(lm, device.type) if compile else _decode_step
        graphs = compile and device.type == "cuda"
        # the compiled step gets the same input tensors every step, advanced in place
        position, slot = new_pos[:, :1].clone(), slots[T : T + 1].clone()  # (B, 1), (1,)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for j in range(n_new):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            token = sample(logits, temperature, top_k, top_p, min_p, generator)  # (B,)
            if eos is not None:
                token = token.masked_fill(finished, pad_token_id)
                finished = finished | torch.isin(token, eos)
            yield token, finished
            if j == n_new - 1:
                break
            if eos is not None and (j + 1) % sync_every == 0 and bool(finished.all()):
                break
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if compile:
                if graphs:  # the previous step's graph outputs (logits) are consumed by now
                    torch.compiler.cudagraph_mark_step_begin()
                # From the second step on, every guard of the compiled step is known to pass (same
                # model, cache and input tensors, advanced in place), so only the guards that pick
                # between compiled variants run: evaluating all of them costs ~0.5 ms a step on CPU.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=j > 0):
                    logits = step(lm, cache, token[:, None], position, slot, key_valid, None)
                position += 1
                slot += 1
            else:  # eager: views into the tables, attention over the kv_len filled slots only
                mask = key_valid if padded else None
                pos_j, slot_j = new_pos[:, j : j + 1], slots[T + j : T + j + 1]
                logits = step(lm, cache, token[:, None], pos_j, slot_j, mask, T + j + 1)
    finally:
        if compile:
            _idle_caches[lm] = cache


def stream(model, input_ids, **settings):
    """Yield the next token of every row, (B,), as soon as it is sampled (no host sync on CUDA).

    Settings as `generate`: attention_mask, max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, eos_token_id, pad_token_id, seed, pixel_values, input_features, compile,
    sync_every. Finished rows yield pad_token_id.
    """
    for token, _ in _steps(model, input_ids, **settings):
        yield token


def generate(model, input_ids, **settings) -> torch.Tensor:
    """Prompt plus new tokens (B, T + n), like transformers' generate; finished rows are padded.

    Stops when every row produced an eos token or after max_new_tokens (capped by the context).
    """
    input_ids = _as_batch(input_ids).to(model.device)
    tokens, finished = [], []
    for token, done in _steps(model, input_ids, **settings):
        tokens.append(token)
        finished.append(done)
    if not tokens:
        return input_ids
    new = torch.stack(tokens, dim=1)  # (B, n)
    # With sync_every > 1 the loop may run a few all-finished steps; cut them (one sync, at the end).
    all_done = torch.stack(finished).all(-1)  # (n,)
    if bool(all_done.any()):
        new = new[:, : int(all_done.int().argmax()) + 1]
    return torch.cat([input_ids, new], dim=1)
