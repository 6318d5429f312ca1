"""Evaluation: strided perplexity of a text, exact-match accuracy of a task file, and (harness.py) an
lm-evaluation-harness model."""

from __future__ import annotations

import json

from .perplexity import strided_perplexity
from .tasks import read_tasks, task_accuracy

__all__ = ["strided_perplexity", "read_tasks", "task_accuracy", "evaluate"]


def evaluate(model, text=None, tasks=None, quantize=None, context=None, stride=None, max_new_tokens=16):
    """`omnilm eval`: strided perplexity of a UTF-8 text file, or exact-match accuracy of a task file.
    Returns (result dict, one summary line)."""
    from ..api import load, load_processor, resolve
    from ..convert.hf import checkpoint_dir
    from ..errors import ConfigError

    model_dir = checkpoint_dir(resolve(model))
    processor = load_processor(model_dir)
    if text:
        try:
            content = open(text, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{text}: not UTF-8 text ({e})") from None
        lm = load(model_dir, quantize=quantize)
        context = context or lm.config.decoder.max_seq_len
        ids = processor.tokenizer.encode(content, add_bos=True)
        result = {
            "text": text,
            "context": context,
            **strided_perplexity(lm, ids, context, stride),
        }
        line = f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens ({result['windows']} windows)"
    else:
        samples = read_tasks(tasks)
        lm = load(model_dir, quantize=quantize)
        meta = model_dir / "processor_config.json"
        fmt = json.loads(meta.read_text()).get("prompt_format", "plain") if meta.is_file() else "plain"
        result = {"tasks": tasks, **task_accuracy(lm, processor, samples, max_new_tokens, fmt)}
        line = f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
    result["quantize"] = quantize
    return result, line
