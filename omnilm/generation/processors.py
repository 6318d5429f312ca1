"""Logits processors: per-request rules applied to the next-token logits before sampling.

Every processor has `process(logits (B, V)) -> logits` and `update(token (B,))`; the engine gives each
request its own instances (B = 1 there), so rules never leak between requests of a batch.

- SpanController: the modality spans of discrete (early-fusion) models. A per-row state machine over
  the concatenated vocabulary [text | image | audio]: outside spans only text ids may be sampled;
  after `<|image_start|>` exactly tokens_per_image image codes (image head only), then
  `<|image_end|>` is forced; likewise for audio; text resumes after.
- Classifier-free guidance (`guide`, `null_prompt`): the engine decodes an unconditional twin of the
  request (the prompt with its conditioning removed) and, inside image spans, samples from
  uncond + scale * (cond - uncond); both are then fed the same token.
- Penalties: CTRL-style repetition penalty and OpenAI-style presence/frequency penalties.
"""

from __future__ import annotations

import functools

import torch

from .sampling import apply_repetition_penalty

# controller states
TEXT, IMAGE_CODES, AUDIO_CODES, IMAGE_END, AUDIO_END = range(5)


@functools.lru_cache(maxsize=16)
def _allowed(cfg_key: tuple, device) -> torch.Tensor:
    """(5, V) bool: the ids each controller state may emit, built once per discrete layout."""
    (
        text_vocab,
        image_offset,
        audio_offset,
        V,
        image_start,
        image_end,
        audio_start,
        audio_end,
        has_image,
        has_audio,
    ) = cfg_key
    allowed = torch.zeros(5, V, dtype=torch.bool)
    allowed[TEXT, :text_vocab] = True
    allowed[TEXT, [image_end, audio_end]] = False  # no closing a span that is not open
    if not has_image:
        allowed[TEXT, image_start] = False
    if not has_audio:
        allowed[TEXT, audio_start] = False
    allowed[IMAGE_CODES, image_offset:audio_offset] = True
    allowed[AUDIO_CODES, audio_offset:V] = True
    allowed[IMAGE_END, image_end] = True
    allowed[AUDIO_END, audio_end] = True
    return allowed.to(device)


class SpanController:
    """One request's span state machine: masks its logits (1, V) to what it may emit next and
    advances on each sampled token. The state is two Python ints, so a step costs one masked_fill."""

    def __init__(self, cfg, batch: int = 1, device=None):
        if batch != 1:
            raise ValueError("a SpanController follows one request (the engine gives each its own)")
        self.cfg = cfg
        key = (cfg.text_vocab_size, cfg.image_offset, cfg.audio_offset, cfg.vocab_size, cfg.image_start_id,
               cfg.image_end_id, cfg.audio_start_id, cfg.audio_end_id, bool(cfg.image_vocab_size),
               bool(cfg.audio_vocab_size))  # fmt: skip
        self.allowed = _allowed(key, torch.device(device) if device is not None else torch.device("cpu"))
        self.state, self.left = TEXT, 0  # left: codes still to sample in the open span

    @classmethod
    def from_prompt(cls, cfg, input_ids) -> SpanController:
        """A controller in the state its prompt (a list, or a (1, T) tensor) leaves it in: a prompt may
        end inside a span, e.g. with `<|image_start|>` to ask for an image."""
        device = input_ids.device if torch.is_tensor(input_ids) else None
        ids = input_ids.tolist() if torch.is_tensor(input_ids) else list(input_ids)
        if ids and isinstance(ids[0], list):
            (ids,) = ids
        ctl = cls(cfg, 1, device)
        for token in ids:
            ctl.state, ctl.left = _next_state(cfg, ctl.state, ctl.left, token)
        return ctl

    @property
    def in_image(self) -> bool:
        """Sampling image codes now."""
        return self.state == IMAGE_CODES

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) with every id the request may not emit next set to -inf."""
        return logits.masked_fill(~self.allowed[self.state], float("-inf"))

    def update(self, token):
        """Advance by the sampled token (an int or a one-element tensor)."""
        self.state, self.left = _next_state(self.cfg, self.state, self.left, int(token))


def _next_state(cfg, state: int, left: int, token: int) -> tuple[int, int]:
    """One step of the span state machine: (state, codes left) after `token`."""
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


class Penalties:
    """Repetition (CTRL), presence and frequency (OpenAI) penalties over one request's ids so far."""

    def __init__(
        self, vocab_size: int, prompt_ids, repetition=None, presence=0.0, frequency=0.0, device=None
    ):
        self.repetition = repetition if repetition not in (None, 1.0) else None
        self.presence, self.frequency = presence or 0.0, frequency or 0.0
        self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)  # (1, V) prompt + output
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        self.seen[0, ids[ids < vocab_size]] = True  # ids past the head (Mllama's <|image|>) have no logit
        self.counts = torch.zeros(1, vocab_size, device=device)  # (1, V) generated ids only, as OpenAI counts

    @staticmethod
    def needed(repetition=None, presence=0.0, frequency=0.0) -> bool:
        """Whether these settings change any logit (else no Penalties is made: two vocabulary-sized
        tensors per request)."""
        return repetition not in (None, 1.0) or bool(presence) or bool(frequency)

    def process(self, logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """logits (1, V') cover ids [offset, offset + V') (one modality's head, or the whole vocabulary)."""
        seen, counts = (
            self.seen[:, offset : offset + logits.shape[-1]],
            self.counts[:, offset : offset + logits.shape[-1]],
        )
        if self.repetition is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition)
        if self.presence or self.frequency:
            logits = logits - self.frequency * counts - self.presence * (counts > 0)
        return logits

    def update(self, token: torch.Tensor):
        self.seen[0, token] = True
        self.counts[0, token] += 1
