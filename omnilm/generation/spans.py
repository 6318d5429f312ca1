"""Generation for discrete (early-fusion) models: modality spans, classifier-free guidance, media decoding.

A span controller is a per-row state machine over the concatenated vocabulary [text | image | audio]:
outside spans only text ids may be sampled; after `<|image_start|>` exactly tokens_per_image image
codes are sampled (image head only), then `<|image_end|>` is forced; likewise for audio; text
resumes after. Classifier-free guidance runs the conditional rows and unconditional rows (the prompt
replaced by a null prompt) in one batch and, inside image spans, samples from
uncond + scale * (cond - uncond); both rows of a pair are then fed the same token.

A model directory keeps the tokenizers its codes come from in image_tokenizer/ and audio_tokenizer/
(written by ImageTokenizer.save / AudioTokenizer.save); decode_media turns generated spans back
into PIL images and waveforms with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, ContextLengthError, MediaError
from .engine import COMPILED_LEN_MULTIPLE, CUDA_SYNC_EVERY, _idle_caches, _take_cache
from .sampling import sample

# controller states
TEXT, IMAGE_CODES, AUDIO_CODES, IMAGE_END, AUDIO_END = range(5)


class SpanController:
    """Masks logits (B, V) to what each row may emit next and advances on the sampled tokens.

    Runs on the device without host syncs: the state is two (B,) tensors updated with torch.where.
    """

    def __init__(self, cfg, batch: int, device=None):
        self.cfg = cfg
        V = cfg.vocab_size
        allowed = torch.zeros(5, V, dtype=torch.bool)
        allowed[TEXT, : cfg.text_vocab_size] = True
        allowed[TEXT, [cfg.image_end_id, cfg.audio_end_id]] = False  # no closing a span that is not open
        if not cfg.image_vocab_size:
            allowed[TEXT, cfg.image_start_id] = False
        if not cfg.audio_vocab_size:
            allowed[TEXT, cfg.audio_start_id] = False
        allowed[IMAGE_CODES, cfg.image_offset : cfg.audio_offset] = True
        allowed[AUDIO_CODES, cfg.audio_offset : V] = True
        allowed[IMAGE_END, cfg.image_end_id] = True
        allowed[AUDIO_END, cfg.audio_end_id] = True
        self.allowed = allowed.to(device)
        self.state = torch.full((batch,), TEXT, dtype=torch.long, device=device)
        self.left = torch.zeros(batch, dtype=torch.long, device=device)  # codes still to sample in the span

    @classmethod
    def from_prompt(cls, cfg, input_ids: torch.Tensor) -> SpanController:
        """A controller whose rows start in the state the prompt leaves them in (a prompt may end inside
        a span, e.g. with `<|image_start|>` to ask for an image)."""
        ctl = cls(cfg, input_ids.shape[0], input_ids.device)
        states = []
        for ids in input_ids.tolist():  # one host read, then plain Python over the prompt
            state, left = TEXT, 0
            for token in ids:
                state, left = _next_state(cfg, state, left, token)
            states.append((state, left))
        ctl.state = torch.tensor([s for s, _ in states], dtype=torch.long, device=input_ids.device)
        ctl.left = torch.tensor([n for _, n in states], dtype=torch.long, device=input_ids.device)
        ctl.prompt_states = states  # host copy: lets the loop see a whole-image generation up front
        return ctl

    @property
    def in_image(self) -> torch.Tensor:
        """(B,) rows sampling image codes now."""
        return self.state == IMAGE_CODES

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) with every id the row may not emit next set to -inf."""
        return logits.masked_fill(~self.allowed[self.state], float("-inf"))

    def update(self, token: torch.Tensor):
        """Advance every row by its sampled token (B,)."""
        cfg = self.cfg
        state, left = self.state, self.left
        in_codes = (state == IMAGE_CODES) | (state == AUDIO_CODES)
        left = torch.where(in_codes, left - 1, left)
        nxt = torch.where(in_codes & (left == 0), state + 2, state)  # codes done -> force the end marker
        nxt = torch.where((state == IMAGE_END) | (state == AUDIO_END), torch.full_like(state, TEXT), nxt)
        opens_image = (state == TEXT) & (token == cfg.image_start_id) & (cfg.tokens_per_image > 0)
        opens_audio = (state == TEXT) & (token == cfg.audio_start_id) & (cfg.tokens_per_audio > 0)
        nxt = torch.where(opens_image, torch.full_like(state, IMAGE_CODES), nxt)
        nxt = torch.where(opens_audio, torch.full_like(state, AUDIO_CODES), nxt)
        left = torch.where(opens_image, torch.full_like(left, cfg.tokens_per_image), left)
        left = torch.where(opens_audio, torch.full_like(left, cfg.tokens_per_audio), left)
        self.state, self.left = nxt, left


def _next_state(cfg, state: int, left: int, token: int) -> tuple[int, int]:
    """The scalar transition SpanController.update vectorizes (used to replay a prompt)."""
    if state in (IMAGE_CODES, AUDIO_CODES):
        left -= 1
        return (state + 2, 0) if left == 0 else (state, left)
    if state in (IMAGE_END, AUDIO_END):
        return TEXT, 0
    if token == cfg.image_start_id and cfg.tokens_per_image:
        return IMAGE_CODES, cfg.tokens_per_image
    if token == cfg.audio_start_id and cfg.tokens_per_audio:
        return AUDIO_CODES, cfg.tokens_per_audio
    return TEXT, 0


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond) (scale 1 gives cond)."""
    return uncond + scale * (cond - uncond)


def null_prompt(cfg, input_ids: torch.Tensor, bos_token_id=None) -> list[list[int]]:
    """Each row's unconditional prompt: its bos (if it starts with one) plus the open span at its end,
    i.e. the prompt with all conditioning text and media removed."""
    rows = []
    for ids in input_ids.tolist():
        ids = [t for t in ids if t >= 0]  # negative ids mark padding
        start = None
        ctl_state = TEXT
        left = 0
        for i, token in enumerate(ids):
            ctl_state, left = _next_state(cfg, ctl_state, left, token)
            if ctl_state in (IMAGE_CODES, AUDIO_CODES) and token in (cfg.image_start_id, cfg.audio_start_id):
                start = i
            elif ctl_state == TEXT:
                start = None
        row = [bos_token_id] if bos_token_id is not None and bos_token_id in ids[:1] else []
        rows.append(row + (ids[start:] if start is not None else []))
    return rows


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, rows right-aligned."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r, device=device)
            mask[i, T - len(r) :] = 1
    return ids, mask


# ---- the decode loop ---------------------------------------------------------------------------------

# The compiled-step constants (cache length rounded to COMPILED_LEN_MULTIPLE, a host read every
# CUDA_SYNC_EVERY steps on CUDA) and the idle-cache pool are engine.py's, shared by both loops.


def _decode_step(model, cache, token, position_ids, slot, key_valid, kv_len, only=None):
    """Logits (rows, V) for one new token per row, through the discrete embeddings and heads (`only`:
    one modality's head)."""
    return model(
        token,
        attention_mask=key_valid,
        position_ids=position_ids,
        cache=cache,
        cache_position=slot,
        kv_len=kv_len,
        logits_modality=only,
    ).logits[:, -1]


_compiled_steps: dict[str, object] = {}


def _compiled_step(device_type: str):
    """CUDA: replayed as a CUDA graph (fixed shapes: the whole static cache under a full mask)."""
    if device_type not in _compiled_steps:
        mode = "reduce-overhead" if device_type == "cuda" else "default"
        _compiled_steps[device_type] = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled_steps[device_type]


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
    eos_token_id=None,
    seed=None,
    pixel_values=None,
    input_features=None,
    pad_token_id=None,
    guidance_scale=None,
    uncond_input_ids=None,
    repetition_penalty=None,
    compile=None,
):
    """Yield the next token of every row (B,) step by step, with modality spans and optional guidance.

    guidance_scale (None or 1: off) guides image spans; the unconditional prompts are
    `uncond_input_ids` (B, T') if given, else null_prompt() of each row. compile: compile the decode
    step (None: on CUDA only). eos_token_id [] means none. Finished rows yield the pad id.
    """
    cfg = model.config.discrete
    if cfg is None:
        raise ConfigError("span generation needs a model with a discrete config")
    if repetition_penalty not in (None, 1.0):
        raise ConfigError("repetition_penalty is not supported for discrete models")
    device = model.device
    input_ids = input_ids.to(device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    dec = model.config.decoder
    eos = dec.eos_token_id if eos_token_id is None else eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    if pad_token_id is None:
        pad_token_id = (
            dec.pad_token_id if dec.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
        )
    mask = (
        torch.ones(B, T, dtype=torch.long, device=device)
        if attention_mask is None
        else attention_mask.to(device)
    )
    controller = SpanController.from_prompt(cfg, torch.where(mask.bool(), input_ids, pad_token_id))

    guided = guidance_scale is not None and guidance_scale != 1.0
    if guided:
        if uncond_input_ids is None:
            uncond_rows = null_prompt(cfg, torch.where(mask.bool(), input_ids, -1), dec.bos_token_id)
            uncond_input_ids, uncond_mask = _left_pad(uncond_rows, pad_token_id, device)
        else:
            uncond_input_ids = uncond_input_ids.to(device)
            uncond_mask = torch.ones_like(uncond_input_ids)
        # one batch: conditional rows then unconditional rows, right-aligned to one length
        T = max(T, uncond_input_ids.shape[1])
        input_ids = torch.cat(
            [_pad_to(input_ids, T, pad_token_id), _pad_to(uncond_input_ids, T, pad_token_id)]
        )
        mask = torch.cat([_pad_to(mask, T, 0), _pad_to(uncond_mask, T, 0)])
    rows = input_ids.shape[0]
    ctx = dec.max_seq_len
    if T >= ctx:
        raise ContextLengthError(
            f"prompt of {T} tokens does not fit the context of {ctx} tokens (one new token needs {T + 1})"
        )
    n_new = min(max_new_tokens, ctx - T)
    if n_new <= 0:
        return
    # Every row inside an image span that outlasts this call (generate_image): only the image head
    # is computed, since the controller would mask the text and audio logits anyway.
    only = "image" if all(s == IMAGE_CODES and n >= n_new for s, n in controller.prompt_states) else None
    if compile is None:
        compile = device.type == "cuda"
    sync_every = CUDA_SYNC_EVERY if device.type == "cuda" else 1
    length = T + n_new
    if compile:
        length = min(-(-length // COMPILED_LEN_MULTIPLE) * COMPILED_LEN_MULTIPLE, ctx)
    key_valid = torch.ones(rows, length, dtype=torch.bool, device=device)  # (rows, L) False at prompt padding
    key_valid[:, :T] = mask.bool()
    prompt_pos = (key_valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)  # (rows, T) as if each row were alone
    new_pos = prompt_pos[:, -1:] + 1 + torch.arange(n_new, device=device)  # (rows, n_new)
    slots = torch.arange(length, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    cache = _take_cache(model.language_model, rows, length, keep=compile)
    try:
        logits = model(
            input_ids,
            attention_mask=key_valid[:, :T],
            pixel_values=pixel_values,
            input_features=input_features,
            position_ids=prompt_pos,
            cache=cache,
            cache_position=slots[:T],
            kv_len=T,
            logits_slice=slice(-1, None),
            logits_modality=only,
        ).logits[:, -1]  # (rows, V), or (rows, V_image) when only the image head runs
        step = _compiled_step(device.type) if compile else _decode_step
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for j in range(n_new):
            logits = logits.float()
            if guided:
                cond, uncond = logits[:B], logits[B:]
                guided_logits = guide(cond, uncond, guidance_scale)
                logits = (
                    guided_logits if only else torch.where(controller.in_image[:, None], guided_logits, cond)
                )
            if only:
                token = sample(logits, temperature, top_k, top_p, min_p, generator) + cfg.image_offset  # (B,)
            else:
                token = sample(controller.process(logits), temperature, top_k, top_p, min_p, generator)
            if eos is not None:
                token = token.masked_fill(finished, pad_token_id)
                finished = finished | torch.isin(token, eos)
            controller.update(token)
            yield token
            if j == n_new - 1:
                break
            if eos is not None and (j + 1) % sync_every == 0 and bool(finished.all()):
                break
            fed = (
                torch.cat([token, token]) if guided else token
            )  # both rows of a guided pair read the same token
            slot = slots[T + j : T + j + 1]  # (1,)
            if compile:
                if device.type == "cuda":  # the previous graph's outputs (logits) are consumed by now
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step(model, cache, fed[:, None], new_pos[:, j : j + 1], slot, key_valid, None, only)
            else:
                logits = step(
                    model, cache, fed[:, None], new_pos[:, j : j + 1], slot, key_valid, T + j + 1, only
                )
    finally:
        if compile:
            _idle_caches[model.language_model] = cache


def _pad_to(x: torch.Tensor, T: int, value: int) -> torch.Tensor:
    """Left-pad (B, t) to (B, T)."""
    return torch.nn.functional.pad(x, (T - x.shape[1], 0), value=value)


def generate(model, input_ids, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens (B, T + n), like transformers' generate."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = list(stream(model, input_ids, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids.to(model.device), torch.stack(new, dim=1)], dim=1)


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


# ---- finding and decoding spans ------------------------------------------------------------------------


@dataclass
class Span:
    modality: str  # "image" | "audio"
    codes: torch.Tensor  # image: (h, w); audio: (n_q, frames); codec-local ids


def find_spans(cfg, ids) -> list[Span]:
    """Complete spans (start marker, the exact number of codes, end marker) in one row of ids, in order."""
    ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
    spans, i = [], 0
    while i < len(ids):
        kind = None
        if ids[i] == cfg.image_start_id and cfg.tokens_per_image:
            kind, n, lo, hi, end = (
                "image",
                cfg.tokens_per_image,
                cfg.image_offset,
                cfg.audio_offset,
                cfg.image_end_id,
            )
        elif ids[i] == cfg.audio_start_id and cfg.tokens_per_audio:
            kind, n, lo, hi, end = (
                "audio",
                cfg.tokens_per_audio,
                cfg.audio_offset,
                cfg.vocab_size,
                cfg.audio_end_id,
            )
        if kind is not None:
            body = ids[i + 1 : i + 1 + n]
            if len(body) == n and all(lo <= t < hi for t in body) and ids[i + 1 + n : i + 2 + n] == [end]:
                codes = torch.tensor(body) - lo
                if kind == "image":
                    codes = codes.view(cfg.image_grid, cfg.image_grid)
                else:  # frame-major: each frame's residual codes are consecutive
                    codes = codes.view(cfg.audio_frames, cfg.audio_codebooks).T.contiguous()
                spans.append(Span(kind, codes))
                i += n + 2
                continue
        i += 1
    return spans


def decode_media(model_or_cfg, ids, image_tokenizer=None, audio_tokenizer=None, model_dir=None):
    """Find the complete image/audio spans in generated ids (T,) or (B, T) and decode them.

    Returns (images, waves): PIL images and (waveform float32 (samples,), sample_rate) pairs, in the
    order their spans appear. A tokenizer is an ImageTokenizer / AudioTokenizer (omnilm/tokenizers/vq.py,
    flat ids in) or a network from omnilm.load_codec (codes (1, h, w) / (1, n_q, frames) in); one not
    given is loaded from model_dir/image_tokenizer or model_dir/audio_tokenizer when a span needs it.
    A span whose tokenizer cannot be found raises MediaError.
    """
    cfg = getattr(getattr(model_or_cfg, "config", None), "discrete", None) or getattr(
        model_or_cfg, "discrete", None
    )
    cfg = cfg or model_or_cfg
    if not hasattr(cfg, "tokens_per_image"):
        raise ConfigError("decode_media needs a discrete model, ModelConfig or DiscreteConfig")
    ids = torch.as_tensor(ids)
    rows = ids[None] if ids.dim() == 1 else ids
    tokenizers = {"image": image_tokenizer, "audio": audio_tokenizer}
    images, waves = [], []
    for row in rows:
        for span in find_spans(cfg, row):
            tok = tokenizers[span.modality]
            if tok is None:
                tok = tokenizers[span.modality] = _load_media_tokenizer(model_dir, span.modality)
            if isinstance(tok, torch.nn.Module):  # a bare codec network: codes tensors
                with torch.no_grad():
                    out = tok.decode(span.codes[None])
            elif span.modality == "image":  # a tokenizer wrapper: flat ids (row-major)
                out = tok.decode(span.codes.flatten().tolist())
            else:  # frame-major: each frame's residual codes consecutive
                out = tok.decode(span.codes.T.flatten().tolist())
            if span.modality == "image":
                images.append(_to_pil(out))
            else:
                wave = torch.as_tensor(out).detach().float().cpu().reshape(-1).numpy()
                waves.append((wave, int(tok.sample_rate)))
    return images, waves


def _to_pil(decoded):
    from PIL import Image

    if isinstance(decoded, Image.Image):
        return decoded
    x = torch.as_tensor(decoded).detach().float().cpu()
    x = x[0] if x.dim() == 4 else x  # (3, H, W) in [-1, 1]
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(pixels.numpy())


def _load_media_tokenizer(model_dir, modality: str):
    from pathlib import Path

    sub = Path(model_dir) / f"{modality}_tokenizer" if model_dir is not None else None
    if sub is None or not sub.is_dir():
        where = f" and {sub} does not exist" if sub is not None else ""
        raise MediaError(
            f"the generated tokens hold an {modality} span but no {modality} tokenizer was given{where}"
        )
    from ..tokenizers.vq import AudioTokenizer, ImageTokenizer

    return (ImageTokenizer if modality == "image" else AudioTokenizer).load(sub)
