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

import torch

from .sampling import apply_repetition_penalty

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

    @property
    def active(self) -> bool:
        return self.repetition is not None or self.presence != 0.0 or self.frequency != 0.0

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
