"""The demo digits as a training JSONL of chats, for image-text training through `omnilm train`:
each line is a user turn (a rendered digit PNG and "which digit is this?") and the assistant's answer,
the digit. Images are written beside the JSONL (paths in it are relative)."""

from __future__ import annotations

import json
from pathlib import Path

from .data import IMAGE_PROMPTS, load_digits, render_digit


def write_digit_chats(out, n: int = 256, split: str = "train", size: int = 32, seed: int = 0) -> Path:
    """Write out/<split>.jsonl and out/<split>/NNNN.png from the first n digits of the split
    (load_digits(seed): train or held-out "test"); returns the JSONL path."""
    train_x, train_y, test_x, test_y = load_digits(seed)
    images, labels = (train_x, train_y) if split == "train" else (test_x, test_y)
    out = Path(out)
    (out / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (ink, label) in enumerate(zip(images[:n], labels[:n])):
        name = f"{split}/{i:04d}.png"
        render_digit(ink, size).save(out / name)
        user = [{"type": "image", "image": name}, {"type": "text", "text": IMAGE_PROMPTS[0]}]
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": str(int(label))}]
        lines.append(json.dumps({"messages": chat}))
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
