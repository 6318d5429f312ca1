"""Load + first token with checkpoint validation against the same load with the checks stubbed out.

    python benchmarks/bench_load.py                      # CPU: a small and a ~100M-parameter Llama
    python benchmarks/bench_load.py --device cuda        # GPU

The peer is the loader as it was before omnilm/convert/validate.py: the same code path with every
check replaced by the plain call it guards (json.loads, the index's file list, no header parse, no
dtype check). Each row is the best of --repeats runs, the two modes interleaved in one process (order
alternating); "checks alone" times just the validation calls, and the last column adds the opt-in
NaN/Inf scan (--check-weights).
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


def checks_alone(path) -> float:
    """The validation calls a load of `path` makes, timed without the load around them (immune to the
    noise of a shared machine, which swamps a few percent of an end-to-end time)."""
    from omnilm.convert.hf import decoder_config_from_hf, read_state_dict

    state = read_state_dict(path)
    model = omnilm.load(path)
    expected = model.language_model.state_dict()
    t0 = time.perf_counter()
    hf = validate.read_json(Path(path) / "config.json")
    validate.check_hf_decoder(hf, "config.json")
    validate.check_model_size(decoder_config_from_hf(hf), "config.json")
    validate.check_shards(Path(path), ["model.safetensors"])
    validate.check_state(expected, state, "checkpoint")
    return time.perf_counter() - t0


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
    print(
        "| model | unchecked (before) s | validated s | ratio | checks alone ms (% of validated) | + --check-weights s |"
    )
    print("|---|---|---|---|---|---|")
    for name, cfg in configs().items():
        with tempfile.TemporaryDirectory() as tmp:
            model = omnilm.build(cfg, seed=0)
            model.save_pretrained(tmp)  # a plain decoder: Hugging Face llama format
            del model
            load_and_first_token(tmp, device)  # warm the page cache and kernels
            before, after, scan = [], [], []
            for i in range(args.repeats):  # the order alternates: whichever runs first pays for cold caches
                if i % 2:
                    after.append(load_and_first_token(tmp, device))
                with unchecked():
                    before.append(load_and_first_token(tmp, device))
                if not i % 2:
                    after.append(load_and_first_token(tmp, device))
                scan.append(load_and_first_token(tmp, device, check_weights=True))
            b, a, s = min(before), min(after), min(scan)
            c = min(checks_alone(tmp) for _ in range(args.repeats))
            print(
                f"| {name} | {b:.4f} | {a:.4f} | {a / b:.3f} | {c * 1e3:.2f} ({100 * c / a:.1f}%) | {s:.4f} |"
            )


if __name__ == "__main__":
    main()
