"""Exact-match accuracy of greedy answers on a JSONL task file, one question per line:
{"prompt": "which digit is this?", "answer": "7", "image": "img/7.png"}; optional "image", "audio" and
"file" (a path or a list of paths, relative to the task file). The prompt goes through the model's
own processor (the chat template when its processor_config.json says "prompt_format": "chat")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError


def read_tasks(path) -> list[dict]:
    path = Path(path)
    tasks = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(t, dict) or not isinstance(t.get("prompt"), str) or "answer" not in t:
            raise ConfigError(f"{path}:{i}: expected an object with 'prompt' (string) and 'answer'")
        for key in ("image", "audio", "file"):
            files = t.get(key) or []
            files = [files] if isinstance(files, str) else list(files)
            t[key] = [str(path.parent / f) for f in files]
        tasks.append(t)
    if not tasks:
        raise ConfigError(f"{path}: no tasks")
    return tasks


def _batch(processor, prompt_format: str, t: dict):
    images, audio, files = t["image"] or None, t["audio"] or None, t["file"] or None
    if prompt_format != "chat":
        return processor(text=t["prompt"], images=images, audio=audio, files=files)
    parts = [{"type": "image"} for _ in t["image"]] + [{"type": "audio"} for _ in t["audio"]]
    parts += [{"type": "file", "file": f} for f in t["file"]] + [{"type": "text", "text": t["prompt"]}]
    return processor(messages=[{"role": "user", "content": parts}], images=images, audio=audio)


def normalize(text: str) -> str:
    return " ".join(str(text).split()).casefold()


@torch.no_grad()
def task_accuracy(
    model, processor, tasks: list[dict], max_new_tokens: int = 16, prompt_format="plain"
) -> dict:
    """-> {"accuracy", "correct", "total", "mistakes": [(prompt, truth, answer), ...] (first 10)}."""
    tok = processor.tokenizer
    eos = [i for i in (tok.eos_token_id, getattr(tok, "eot_token_id", None)) if i is not None] or None
    correct, mistakes = 0, []
    for t in tasks:
        b = _batch(processor, prompt_format, t)
        ids = b["input_ids"]
        out = model.generate(
            ids,
            attention_mask=b["attention_mask"],
            pixel_values=b["pixel_values"],
            input_features=b["input_features"],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
        )
        answer = tok.decode(out[0, ids.shape[1] :].tolist()).strip()
        if normalize(answer) == normalize(t["answer"]):
            correct += 1
        elif len(mistakes) < 10:
            mistakes.append((t["prompt"], str(t["answer"]), answer))
    return {"accuracy": correct / len(tasks), "correct": correct, "total": len(tasks), "mistakes": mistakes}
