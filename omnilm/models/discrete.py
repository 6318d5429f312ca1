"""Discrete early fusion: image and audio codes as tokens of one vocabulary [text | image | audio].

Each modality has its own embedding table and output head (text keeps the decoder's `embed_tokens`
and `lm_head`, so a pretrained text decoder stays intact); a learned modality embedding is added at
every position so the decoder knows what kind of token it reads. The logits cover the whole
concatenated vocabulary so one sampler serves every modality; the training loss at a position uses
the head of the *target* token's modality: cross-entropy within that head's slice of the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DiscreteConfig
from .loss import token_loss

MODALITIES = ("text", "image", "audio")
TEXT, IMAGE, AUDIO = 0, 1, 2


def modality_of(ids: torch.Tensor, cfg: DiscreteConfig) -> torch.Tensor:
    """0 text, 1 image, 2 audio for every id, same shape as ids (ignored labels, -100, read as text)."""
    return (ids >= cfg.image_offset).long() + (ids >= cfg.audio_offset).long()


def modality_ranges(cfg: DiscreteConfig) -> list[tuple[int, int]]:
    """[lo, hi) of each modality's ids in the concatenated vocabulary, in MODALITIES order."""
    return [
        (0, cfg.text_vocab_size),
        (cfg.image_offset, cfg.audio_offset),
        (cfg.audio_offset, cfg.vocab_size),
    ]


class DiscreteModalities(nn.Module):
    """The image/audio embedding tables and heads plus the modality embedding (OmniModel.discrete)."""

    def __init__(self, cfg: DiscreteConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.modality_embed = nn.Embedding(len(MODALITIES), hidden_size)
        self.image_embed = self.image_head = self.audio_embed = self.audio_head = None
        if cfg.image_vocab_size:
            self.image_embed = nn.Embedding(cfg.image_vocab_size, hidden_size)
            self.image_head = nn.Linear(hidden_size, cfg.image_vocab_size, bias=False)
        if cfg.audio_vocab_size:
            self.audio_embed = nn.Embedding(cfg.audio_vocab_size, hidden_size)
            self.audio_head = nn.Linear(hidden_size, cfg.audio_vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor, text_embed: nn.Embedding) -> torch.Tensor:
        """(B, T) ids of the concatenated vocabulary -> (B, T, D) embeddings."""
        cfg = self.cfg
        modality = modality_of(input_ids, cfg)  # (B, T)
        # Every table is looked up at clamped ids and the right row picked: cheaper than gathering
        # positions per modality, and shape-static for a compiled decode step.
        x = text_embed(input_ids.clamp(0, cfg.text_vocab_size - 1))
        for table, offset, m in (
            (self.image_embed, cfg.image_offset, IMAGE),
            (self.audio_embed, cfg.audio_offset, AUDIO),
        ):
            if table is not None:
                local = (input_ids - offset).clamp(0, table.num_embeddings - 1)
                x = torch.where((modality == m)[..., None], table(local).to(x.dtype), x)
        return x + self.modality_embed(modality).to(x.dtype)

    def logits(self, hidden: torch.Tensor, text_head: nn.Linear, only: str | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, V_text + V_image + V_audio), or one modality's head alone (`only`: a
        name in MODALITIES), e.g. while sampling an image span, where the other heads are masked anyway."""
        if only is not None:
            return {"text": text_head, "image": self.image_head, "audio": self.audio_head}[only](hidden)
        parts = [text_head(hidden)]
        parts += [head(hidden) for head in (self.image_head, self.audio_head) if head is not None]
        return torch.cat(parts, dim=-1)

    def loss_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple]]:
        """Summed next-token cross-entropy, each position scored by its target's head, for loops that
        divide by a global token count themselves (training/loop.py under data parallelism).

        logits (B, T, V) and labels (B, T) are aligned as in OmniModel.forward (labels[:, t + 1] is the
        target of logits[:, t]; -100 is ignored). Returns (sum_m w_m * CE_sum_m, {modality: (CE_sum_m,
        n_m)}) over the modalities present in the batch.
        """
        cfg = self.cfg
        logits = logits[:, :-1].flatten(0, 1)  # (N, V)
        targets = labels[:, 1:].flatten()  # (N,)
        valid = targets != -100
        modality = modality_of(targets, cfg)
        weights = (cfg.text_loss_weight, cfg.image_loss_weight, cfg.audio_loss_weight)
        total = logits.sum() * 0.0  # a zero that still backpropagates when nothing is scored
        sums = {}
        for m, (lo, hi) in enumerate(modality_ranges(cfg)):
            sel = valid & (modality == m)
            n = int(sel.sum())
            if n == 0 or hi == lo:
                continue
            ce = token_loss(logits[sel, lo:hi], targets[sel] - lo, reduction="sum")
            sums[MODALITIES[m]] = (ce, n)
            total = total + weights[m] * ce
        return total, sums

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-modality losses). The loss is the weighted token mean
        sum_m w_m * CE_sum_m / sum_m w_m * n_m, the plain token mean when all weights are 1; the
        per-modality losses are unweighted token means of the modalities present in the batch."""
        total, sums = self.loss_sums(logits, labels)
        weights = dict(
            zip(
                MODALITIES,
                (self.cfg.text_loss_weight, self.cfg.image_loss_weight, self.cfg.audio_loss_weight),
            )
        )
        denom = sum(weights[m] * n for m, (_, n) in sums.items())
        losses = {m: ce / n for m, (ce, n) in sums.items()}
        return (total / denom if denom > 0 else total), losses
