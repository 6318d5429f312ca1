"""Load + first token with checkpoint validation against the same load with the checks stubbed out.

    python benchmarks/bench_load.py                      # CPU: a small and a ~100M-parameter Llama
    python benchmarks/bench_load.py --device cuda        # GPU

The peer is the loader as it was before omnilm/convert/validate.py: the same code path with every
check replaced by the plain call it guards (json.loads, the index's file list, no header parse, no
dtype check). Each row is the best of --repeats runs, the two modes interleaved in one process; a
third row adds the NaN/Inf scan (--check-weights), which is opt-in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.convert import validate


def configs() -> dict[str, ModelConfig]:
    small = DecoderConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                          intermediate_size=768, tie_embeddings=False)  # fmt: skip
    medium = DecoderConfig(vocab_size=32000, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4,
                           intermediate_size=2048, tie_embeddings=False)  # fmt: skip
    return {"small (8M)": ModelConfig(decoder=small), "medium (100M)": ModelConfig(decoder=medium)}


@contextlib.contextmanager
def unchecked():
    """The loader without validation: each check replaced by what the code did before it."""
    saved = {n: getattr(validate, n) for n in ("read_json", "index_files", "check_shards", "check_state",
                                               "check_hf_decoder", "check_model_size", "check_config_types")}  # fmt: skip
    validate.read_json = lambda path, error=None: json.loads(Path(path).read_text())
    validate.index_files = lambda path, index, f: sorted(set(index.get("weight_map", {}).values()))
    validate.check_shards = lambda path, files: None
    validate.check_state = lambda expected, state, source: state
    validate.check_hf_decoder = lambda d, source: None
    validate.check_model_size = lambda dcfg, source, dtype=None: None
    validate.check_config_types = lambda cfg, source, where="": None
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(validate, n, fn)


def load_and_first_token(path, device, check_weights=False) -> float:
    ids = torch.tensor([[1, 17, 42, 99]], device=device)
    t0 = time.perf_counter()
    model = omnilm.load(path, device=device, check_weights=check_weights)
    model.generate(ids, max_new_tokens=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, best of {args.repeats}\n")
    print("| model | unchecked (before) s | validated s | ratio | + --check-weights s |")
    print("|---|---|---|---|---|")
    for name, cfg in configs().items():
        with tempfile.TemporaryDirectory() as tmp:
            model = omnilm.build(cfg, seed=0)
            model.save_pretrained(tmp)  # a plain decoder: Hugging Face llama format
            del model
            load_and_first_token(tmp, device)  # warm the page cache and kernels
            before, after, scan = [], [], []
            for _ in range(args.repeats):
                with unchecked():
                    before.append(load_and_first_token(tmp, device))
                after.append(load_and_first_token(tmp, device))
                scan.append(load_and_first_token(tmp, device, check_weights=True))
            b, a, s = min(before), min(after), min(scan)
            print(f"| {name} | {b:.4f} | {a:.4f} | {a / b:.3f} | {s:.4f} |")


if __name__ == "__main__":
    main()
