"""Held-out evaluation of the demo model, the judge for drawn digits, and the PNG grid.

Answers are produced by greedy generation through the model's own `generate` (prefill + KV cache)
and compared with the truth as strings. Drawn digits are sampled code by code from the image code
range, decoded by the VQ-VAE and read by a classifier trained separately on the real digits.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .data import Sample


def pixels_to_ink(pixels: torch.Tensor) -> np.ndarray:
    """Processor pixels (N, 3, H, W) in [-1, 1], white paper = 1 -> ink maps (N, H*W) in [0, 1]."""
    return ((1.0 - pixels.float().mean(1).clamp(-1, 1)) / 2).flatten(1).numpy()


def train_judge(pixels: torch.Tensor, labels: np.ndarray, seed: int = 0):
    """An RBF SVM on 16x16 ink maps of the real training digits: the reader of generated digits."""
    from sklearn.svm import SVC

    return SVC(C=10.0, gamma="scale", random_state=seed).fit(pixels_to_ink(pixels), labels)


def _generate(model, samples: list[Sample], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy answers for samples with prompts of one length (one batch, no padding)."""
    ids = torch.tensor([s.prompt for s in samples])  # (B, T)
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    feats = [s.input_features for s in samples if s.input_features is not None]
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pixel_values=torch.cat(pix) if pix else None,
        input_features=torch.cat(feats) if feats else None,
    )
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        answers.append(row[: row.index(eos_id)] if eos_id in row else row)
    return answers


@torch.no_grad()
def answer_accuracy(
    model, samples: list[Sample], tokenizer, max_new_tokens: int = 8, batch_size: int = 64
) -> tuple[float, list]:
    """Exact-match accuracy of greedy answers; samples are batched by prompt length."""
    by_len: dict[int, list[Sample]] = {}
    for s in samples:
        by_len.setdefault(len(s.prompt), []).append(s)
    correct, mistakes = 0, []
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            for s, ids in zip(chunk, _generate(model, chunk, max_new_tokens, tokenizer.eos_token_id)):
                text = tokenizer.decode(ids).strip()
                if text == s.target:
                    correct += 1
                elif len(mistakes) < 5:
                    mistakes.append((s.target, text))
    return correct / max(1, len(samples)), mistakes


@torch.no_grad()
def draw_digits(
    model,
    prompts: list[list[int]],
    temperature: float = 0.5,
    top_k: int = 10,
    seed: int = 0,
    batch_size: int = 100,
) -> torch.Tensor:
    """Image codes (N, h, w) sampled after each prompt + <|image_start|> by the span generator, which
    draws exactly h*w codes from the image head. Prompts of one length."""
    from ..generation.generate import generate_image

    out = []
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i : i + batch_size])  # (B, T)
        out.append(generate_image(model, ids, temperature=temperature, top_k=top_k, seed=seed + i))
    return torch.cat(out)


def digit_grid(pixels: torch.Tensor, rows: int, scale: int = 4) -> Image.Image:
    """Images (N, 3, H, W) in [-1, 1] laid out row-major in a grid of `rows` rows, upscaled for viewing."""
    N, _, H, W = pixels.shape
    cols = -(-N // rows)
    grid = np.full((rows * (H + 2), cols * (W + 2), 3), 255, np.uint8)
    img = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for i in range(N):
        r, c = divmod(i, cols)
        grid[r * (H + 2) + 1 : r * (H + 2) + 1 + H, c * (W + 2) + 1 : c * (W + 2) + 1 + W] = img[i]
    out = Image.fromarray(grid)
    return out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
