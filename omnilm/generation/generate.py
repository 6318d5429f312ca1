"""model.generate and model.stream over the engine: a (B, T) left-padded batch becomes B requests of a
private Engine, and their tokens come back column by column, as transformers' generate returns them."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, OmniLMError
from .config import GenerationConfig
from .engine import PAGE_SIZE, Engine

SETTINGS = {f for f in GenerationConfig.__dataclass_fields__}


def split_settings(kwargs: dict) -> tuple[GenerationConfig, dict]:
    """(GenerationConfig from the generation keywords, the rest: media and family inputs)."""
    config = kwargs.pop("generation_config", None) or GenerationConfig()
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTINGS}
    if "eos_token_id" in settings and settings["eos_token_id"] is None:
        del settings["eos_token_id"]
    return config.updated(**settings), kwargs


def _rows(model, input_ids, attention_mask, media: dict, uncond_input_ids=None):
    """A (B, T) left-padded batch -> per-row (prompt ids, media of that row, uncond ids)."""
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    B = input_ids.shape[0]
    if attention_mask is not None and not bool(attention_mask.bool()[:, -1].all()):
        raise OmniLMError("generation needs left padding: every row's last prompt token must be real")
    rows = [
        row[attention_mask[i].bool()].tolist() if attention_mask is not None else row.tolist()
        for i, row in enumerate(input_ids.cpu())
    ]
    per_row = [dict() for _ in range(B)]
    cfg = model.config
    for name, token_id, per_item in (
        ("pixel_values", cfg.image_token_id, cfg.vision.tokens_per_image if cfg.vision else None),
        ("input_features", cfg.audio_token_id, cfg.audio.tokens_per_window if cfg.audio else None),
    ):
        values = media.pop(name, None)
        if values is None:
            continue
        if B == 1 or per_item is None:
            per_row[0][name] = values
            continue
        taken = 0
        for i, ids in enumerate(rows):  # row i's placeholders, in order, take the next items
            n = sum(t == token_id for t in ids) // per_item
            per_row[i][name] = values[taken : taken + n] if n else None
            taken += n
    if media:  # family inputs (aspect ratios, masks, ...) go with a single prompt as they are
        if B > 1:
            raise OmniLMError(f"{', '.join(media)}: batched generation with these inputs is not supported; "
                              "submit one prompt at a time")  # fmt: skip
        per_row[0].update(media)
    uncond = [None] * B
    if uncond_input_ids is not None:
        uncond = [
            r.tolist() for r in (uncond_input_ids[None] if uncond_input_ids.dim() == 1 else uncond_input_ids)
        ]
    return rows, per_row, uncond


def stream_requests(model, input_ids, attention_mask=None, compile=False, **kwargs):
    """Submit every row of a batch to a private engine and yield, per step, (tokens, finished): the
    next token of each row (B,) and which rows finished. Finished rows yield the pad id."""
    config, media = split_settings(kwargs)
    uncond = media.pop("uncond_input_ids", None)
    rows, per_row, uncond_rows = _rows(model, input_ids, attention_mask, media, uncond)
    dec = model.config.decoder
    pad = config.pad_token_id if config.pad_token_id is not None else dec.pad_token_id
    eos = dec.eos_token_id if config.eos_token_id is None else config.eos_token_id
    eos_list = [eos] if isinstance(eos, int) else list(eos or ())
    if pad is None:
        pad = eos_list[0] if eos_list else 0
    longest = max(len(r) for r in rows)
    need = sum(2 if config.guided else 1 for _ in rows) * math.ceil(
        min(longest + config.max_new_tokens, dec.max_seq_len) / PAGE_SIZE
    )
    engine = Engine(model, max_batch=len(rows), max_queue=len(rows), num_pages=max(need, 1), compile=compile)
    # Row i samples with seed + i: its own generator (a row's tokens do not depend on the others),
    # and rows of one prompt repeated still differ, as with transformers' shared generator.
    configs = [
        config if config.seed is None else config.updated(seed=config.seed + i) for i in range(len(rows))
    ]
    reqs = [engine.submit(*a) for a in zip(rows, configs, per_row, [None] * len(rows), uncond_rows)]
    emitted = [0] * len(reqs)
    try:
        while engine.has_work() or any(emitted[i] < len(r.output) for i, r in enumerate(reqs)):
            if engine.has_work():
                engine.step()
            for r in reqs:
                if r.error is not None:
                    raise r.error
            # a column is ready once every row has its token there or has finished
            while all(emitted[i] < len(r.output) or r.finished for i, r in enumerate(reqs)):
                if all(emitted[i] >= len(r.output) for i, r in enumerate(reqs)):
                    break
                col = [
                    r.output[emitted[i]] if emitted[i] < len(r.output) else pad for i, r in enumerate(reqs)
                ]
                # finished: this column's token is the row's eos, or padding after it
                fin = [
                    emitted[i] >= len(r.output) or r.output[emitted[i]] in r.eos for i, r in enumerate(reqs)
                ]
                emitted = [e + 1 for e in emitted]
                yield torch.tensor(col, device=model.device), torch.tensor(fin, device=model.device)
    finally:
        for r in reqs:
            r.cancel()
        if engine.has_work():
            engine.step(admit=False)


def stream(model, input_ids, **kwargs):
    """Yield the next token of every row, (B,), as it is sampled; finished rows yield the pad id."""
    for tokens, _ in stream_requests(model, input_ids, **kwargs):
        yield tokens


def generate(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens (B, T + n), like transformers' generate; finished rows are padded."""
    input_ids = (input_ids[None] if input_ids.dim() == 1 else input_ids).to(model.device)
    cols = [t for t, _ in stream_requests(model, input_ids, attention_mask=attention_mask, **kwargs)]
    if not cols:
        return input_ids
    return torch.cat([input_ids, torch.stack(cols, dim=1)], dim=1)


def generate_image(
    model, input_ids, guidance_scale=None, temperature=1.0, top_k=None, top_p=None, seed=None, **kwargs
):
    """Image codes (B, h, w) for text prompts (B, T): appends `<|image_start|>` when the prompt does not
    end with it and samples exactly one image span."""
    cfg = model.config.discrete
    if cfg is None or not cfg.image_vocab_size:
        raise ConfigError("this model has no discrete image modality")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if not bool((input_ids[:, -1] == cfg.image_start_id).all()):
        start = torch.full(
            (input_ids.shape[0], 1), cfg.image_start_id, dtype=input_ids.dtype, device=input_ids.device
        )
        input_ids = torch.cat([input_ids, start], dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones_like(start)], dim=1)
    out = generate(
        model,
        input_ids,
        max_new_tokens=cfg.tokens_per_image,
        guidance_scale=guidance_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=[],
        **kwargs,
    )
    codes = out[:, input_ids.shape[1] :] - cfg.image_offset  # (B, h * w)
    return codes.view(-1, cfg.image_grid, cfg.image_grid)
