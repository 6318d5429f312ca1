"""Evaluation: strided perplexity of a text, exact-match accuracy of a task file, and (harness.py) an
lm-evaluation-harness model."""

from __future__ import annotations

import json

from .perplexity import strided_perplexity
from .tasks import read_tasks, task_accuracy

__all__ = ["strided_perplexity", "read_tasks", "task_accuracy", "cmd_eval"]


def cmd_eval(args):
    from ..api import load, load_processor, resolve
    from ..convert.hf import checkpoint_dir
    from ..errors import ConfigError

    model_dir = checkpoint_dir(resolve(args.model))
    processor = load_processor(model_dir)
    if args.text:
        try:
            text = open(args.text, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{args.text}: not UTF-8 text ({e})") from None
        model = load(model_dir, quantize=args.quantize)
        context = args.context or model.config.decoder.max_seq_len
        ids = processor.tokenizer.encode(text, add_bos=True)
        result = {
            "text": args.text,
            "context": context,
            **strided_perplexity(model, ids, context, args.stride),
        }
        line = f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens ({result['windows']} windows)"
    else:
        tasks = read_tasks(args.tasks)
        model = load(model_dir, quantize=args.quantize)
        meta = model_dir / "processor_config.json"
        fmt = json.loads(meta.read_text()).get("prompt_format", "plain") if meta.is_file() else "plain"
        result = {"tasks": args.tasks, **task_accuracy(model, processor, tasks, args.max_new_tokens, fmt)}
        line = f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
    result["quantize"] = args.quantize
    print(json.dumps(result) if args.json else line)
