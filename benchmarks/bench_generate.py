"""Generation speed, OmniLM against transformers: same random weights, dtype and device, one process.

    python benchmarks/bench_generate.py --small                   # CPU, fp32, a small Llama shape
    python benchmarks/bench_generate.py --preset llama-3.2-1b     # GPU, bf16, compiled decode step

The model is built with random weights, saved in Hugging Face format, and loaded by both
`omnilm.load` and `transformers.LlamaForCausalLM.from_pretrained`. Both generate greedily, with
use_cache, exactly the same number of new tokens (OmniLM without eos, transformers with
min_new_tokens), and every number is the best of --repeats runs, the two libraries interleaved.

- decode tok/s: batch * (N - 1) / (time(prompt + N new) - time(prompt + 1 new)), i.e. generation
  with the prefill subtracted;
- generate tok/s: batch * N / time(prompt + N new), end to end;
- prefill tok/s: prompt length / time(prompt + 1 new), batch 1;
- on CUDA, % of bound: the decode rate against the memory-bandwidth bound, bandwidth / bytes read per
  step (weights once, plus every row's KV cache at the mean context), the bandwidth measured here by
  a 1 GiB device-to-device copy.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig, get_preset


def small_config() -> ModelConfig:
    # hidden 256, 4 layers, vocab 4096, 4 heads / 2 kv heads; FFN by Llama's rule
    # (2/3 * 4 * hidden rounded up to a multiple of 256)
    return ModelConfig(
        decoder=DecoderConfig(
            vocab_size=4096,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=768,
            max_seq_len=4096,
            rope_theta=500000.0,
            tie_embeddings=True,
        ),
        source="bench_generate --small",
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def best_times(fns: dict, device, repeats: int) -> tuple[dict, dict]:
    """Best wall and best CPU time of each function, run interleaved after one warm-up each."""
    for fn in fns.values():
        fn()
    wall, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = timed(fn, device)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    return wall, cpu


def bandwidth(device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(timed(lambda: [dst.copy_(src) for _ in range(10)], device)[0] for _ in range(3))
    return 2 * src.numel() * 10 / t


def bytes_per_step(model, batch: int, context: float) -> float:
    """Weights read once per step (the embedding table only when it is also the output head) plus
    every row's K and V at `context` tokens."""
    cfg = model.config.decoder
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    if not cfg.tie_embeddings:
        emb = model.language_model.model.embed_tokens.weight
        weights -= emb.numel() * emb.element_size()
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * context * model.dtype.itemsize
    return weights + batch * kv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--small", action="store_true", help="the small CPU shape instead of --preset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompt", type=int, default=128, help="prompt length for the decode rows")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 256 on CUDA, 128 on CPU")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--prefill", default=None, help="prefill prompt lengths; default 2048,8192 (CUDA), 256,1024"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile OmniLM's decode step (default: on CUDA only)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()

    import transformers

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = omnilm._dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    new = args.new_tokens or (256 if cuda else 128)
    prefill_lens = [int(x) for x in (args.prefill or ("2048,8192" if cuda else "256,1024")).split(",")]
    cfg = small_config() if args.small else get_preset(args.preset)
    cfg.decoder.eos_token_id = None  # random weights: generate exactly the requested tokens
    name = "small" if args.small else args.preset

    with tempfile.TemporaryDirectory() as tmp:
        omnilm.build(cfg, dtype=dtype).save_pretrained(tmp)
        ours = omnilm.load(tmp, device=device, dtype=dtype)
        ref = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()

    def run_ours(ids, n):
        return lambda: ours.generate(
            ids, max_new_tokens=n, eos_token_id=[], pad_token_id=0, compile=args.compile
        )

    def run_ref(ids, n):
        mask = torch.ones_like(ids)
        return lambda: ref.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            use_cache=True, pad_token_id=0,
        )  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    V = cfg.decoder.vocab_size
    rows = []  # (label, ours, ref, ratio by CPU time, % of bound or None)
    agree = None
    for batch in (1, args.batch):
        ids = torch.randint(0, V, (batch, args.prompt), generator=gen).to(device)
        fns = {
            "ours_n": run_ours(ids, new),
            "ref_n": run_ref(ids, new),
            "ours_1": run_ours(ids, 1),
            "ref_1": run_ref(ids, 1),
        }
        wall, cpu = best_times(fns, device, args.repeats)
        dec = {k: batch * (new - 1) / (wall[f"{k}_n"] - wall[f"{k}_1"]) for k in ("ours", "ref")}
        dec_cpu = {k: (cpu[f"{k}_n"] - cpu[f"{k}_1"]) for k in ("ours", "ref")}
        bound = None
        if cuda:
            per_step = bytes_per_step(ours, batch, args.prompt + new / 2)
            bound = 100 * dec["ours"] / (batch * bandwidth(device) / per_step)
        cpu_ratio = dec_cpu["ref"] / dec_cpu["ours"]
        rows.append((f"decode, batch {batch} (tok/s)", dec["ours"], dec["ref"], cpu_ratio, bound))
        rows.append(
            (f"generate, batch {batch}, {args.prompt} + {new} (tok/s)",
             batch * new / wall["ours_n"], batch * new / wall["ref_n"], cpu["ref_n"] / cpu["ours_n"], None)
        )  # fmt: skip
        if batch == 1:  # greedy outputs of the two should agree (fp32 exactly; bf16 for a while)
            a, b = run_ours(ids, new)(), run_ref(ids, new)()
            diff = (a[0] != b[0]).nonzero()
            agree = new if len(diff) == 0 else int(diff[0]) - args.prompt
    for n in prefill_lens:
        ids = torch.randint(0, V, (1, n), generator=gen).to(device)
        wall, cpu = best_times({"ours": run_ours(ids, 1), "ref": run_ref(ids, 1)}, device, args.repeats)
        rows.append(
            (f"prefill {n} tokens (tok/s)", n / wall["ours"], n / wall["ref"], cpu["ref"] / cpu["ours"], None)
        )

    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    compiled = args.compile if args.compile is not None else cuda
    print(f"\n{name}, {str(dtype).removeprefix('torch.')}, {where}, OmniLM decode step compiled: {compiled}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"greedy batch-1 outputs agree for the first {agree} of {new} new tokens\n")
    last = " % of bandwidth bound |" if cuda else " ratio by process CPU time |"
    print("| measure | OmniLM | transformers | OmniLM / transformers |" + last)
    print("|---|---|---|---|---|")
    for label, a, b, cpu_ratio, pct in rows:
        line = f"| {label} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |"
        if cuda:
            line += f" {pct:.0f}% |" if pct is not None else " |"
        else:
            line += f" {cpu_ratio:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
