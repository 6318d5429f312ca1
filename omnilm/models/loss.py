"""The next-token loss, written once: used by the model, the discrete heads, the training loop and the demo."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against labels (B, T) shifted by one (labels[:, t + 1] is the
    target of logits[:, t]); IGNORE_INDEX labels are not scored. reduction: "mean" or "sum"."""
    return token_loss(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of already aligned logits (N, V) and targets (N,), computed in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
