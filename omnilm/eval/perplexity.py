"""Strided perplexity, the Hugging Face recipe (https://huggingface.co/docs/transformers/perplexity):
windows of `context` tokens advance by `stride`; each window scores only the tokens the previous one
did not, with the earlier tokens as context.

One difference, on purpose: the recipe weights each window's mean loss by `valid labels - 1`, which
is the number of scored tokens only for the first window; here the scored tokens are counted exactly
(sum of losses / number of scored tokens), so the figure is the true per-token perplexity and the
same number whoever computes it this way.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..models.loss import IGNORE_INDEX, next_token_loss


@torch.no_grad()
def strided_perplexity(model, ids: list[int] | torch.Tensor, context: int, stride: int | None = None) -> dict:
    """-> {"perplexity", "nll", "tokens", "windows"}; ids is one token sequence."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise ConfigError(f"perplexity: stride {stride} must be in [1, context={context}]")
    n = ids.shape[1]
    if n < 2:
        raise ConfigError(f"perplexity: the text has {n} token(s); at least 2 are needed")
    device = next(model.parameters()).device
    nll_sum, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        window = ids[:, begin:end].to(device)  # (1, T)
        labels = window.clone()
        labels[:, : -(end - prev_end)] = IGNORE_INDEX  # context only: scored by an earlier window
        logits = model(input_ids=window).logits  # (1, T, V)
        nll_sum += float(next_token_loss(logits, labels, reduction="sum"))
        scored += int((labels[:, 1:] != IGNORE_INDEX).sum())
        windows += 1
        prev_end = end
        if end == n:
            break
    nll = nll_sum / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "windows": windows}
