"""Continuous batching, OmniLM's engine against one-request-at-a-time and transformers' own.

    python benchmarks/bench_batching.py                    # CPU, fp32, small shape (hidden 256, 4 layers)
    python benchmarks/bench_batching.py --device cuda --dtype bfloat16 --requests 256

64 requests (prompts 16-512 tokens, outputs 8-128 tokens, greedy, no eos, seeded), submitted all at
once and with Poisson arrivals, on the same random weights (saved in Hugging Face format and loaded
by both libraries), in one process:
  (a) omnilm's Engine (continuous batching over paged KV, background thread),
  (b) the same engine one request at a time (max_batch=1), i.e. what a server without batching does,
  (c) transformers' ContinuousBatchingManager (`init_continuous_batching`, transformers 5.x).
Throughput = generated tokens / wall time from the first arrival to the last completion; latency =
completion - arrival per request, p50 and p99. Tokens of (a) are checked equal to (b)'s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.generation import Engine, GenerationConfig


def small_config(ctx: int) -> ModelConfig:
    return ModelConfig(
        decoder=DecoderConfig(
            vocab_size=4096,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=768,
            max_seq_len=ctx,
            rope_theta=500000.0,
            tie_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),  # fmt: skip
        source="bench_batching small shape",
    )


def workload(n: int, seed: int, rate: float | None):
    """[(arrival seconds, prompt ids, max_new_tokens)]: all at t=0, or Poisson at `rate` per second."""
    g = torch.Generator().manual_seed(seed)
    out, t = [], 0.0
    for _ in range(n):
        T = int(torch.randint(16, 513, (1,), generator=g))
        N = int(torch.randint(8, 129, (1,), generator=g))
        prompt = torch.randint(3, 4096, (T,), generator=g).tolist()
        if rate:
            t += float(torch.empty(1).exponential_(rate, generator=g))
        out.append((t, prompt, N))
    return out


def run_omnilm(model, work, max_batch: int):
    engine = Engine(model, max_batch=max_batch, max_queue=len(work))
    done, outputs = [0.0] * len(work), [None] * len(work)

    def finisher(i):
        def on_event(ev):
            if ev.finish_reason is not None:
                done[i] = time.perf_counter()

        return on_event

    engine.start()
    start = time.perf_counter()
    reqs = []
    for i, (t, prompt, n) in enumerate(work):
        delay = start + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        cfg = GenerationConfig(max_new_tokens=n, eos_token_id=[])
        reqs.append(engine.submit(prompt, cfg, on_event=finisher(i)))
    for r in reqs:
        r.done.wait()
    engine.stop()
    for i, r in enumerate(reqs):
        outputs[i] = r.output
    return start, done, outputs


def run_transformers(hf_model, work, max_batch: int):
    from transformers import GenerationConfig as HFConfig

    cfg = HFConfig(
        do_sample=False, max_new_tokens=128, eos_token_id=None, pad_token_id=0, max_batch_tokens=None
    )
    manager = hf_model.init_continuous_batching(generation_config=cfg)
    manager.start()
    start = time.perf_counter()
    ids, arrival = {}, {}
    done, outputs = [0.0] * len(work), [None] * len(work)

    def collect():
        got = 0
        while got < len(work):
            res = manager.get_result(timeout=1)
            if res is None:
                continue
            i = ids[res.request_id]
            done[i], outputs[i] = time.perf_counter(), list(res.generated_tokens)
            got += 1

    collector = threading.Thread(target=collect)
    try:
        for i, (t, prompt, n) in enumerate(work):
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            rid = f"r{i}"
            ids[rid], arrival[rid] = i, t
            manager.add_request(prompt, request_id=rid, max_new_tokens=n)
            if i == 0:
                collector.start()
        collector.join()
    finally:
        manager.stop(block=True)
    return start, done, outputs


def summarize(name, work, start, done, outputs):
    tokens = sum(len(o) for o in outputs)
    wall = max(done) - start
    lat = sorted(d - (start + t) for d, (t, _, _) in zip(done, work))
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return dict(name=name, tokens=tokens, wall=wall, tok_s=tokens / wall, p50=statistics.median(lat), p99=p99)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = small_config(1024)
    torch.manual_seed(args.seed)
    built = omnilm.build(cfg, seed=args.seed)
    with torch.no_grad():  # hotter than init, so greedy text does not collapse to one token
        for p in built.parameters():
            p.mul_(3.0)
    with tempfile.TemporaryDirectory() as d:
        built.save_pretrained(d)
        model = omnilm.load(d, device=args.device, dtype=dtype)
        hf = None
        if not args.skip_transformers:
            from transformers import LlamaForCausalLM

            hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(args.device).eval()
    print(f"# {args.requests} requests, prompts 16-512, outputs 8-128, {args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    rows = []
    for label, rate in (("all at once", None), (f"poisson {args.rate}/s", args.rate)):
        work = workload(args.requests, args.seed, rate)
        a = run_omnilm(model, work, args.max_batch)
        b = run_omnilm(model, work, 1)
        same = sum(x == y for x, y in zip(a[2], b[2]))
        rows.append((label, summarize("(a) omnilm engine", work, *a)))
        rows.append((label, summarize("(b) one at a time", work, *b)))
        if hf is not None:
            try:
                c = run_transformers(hf, work, args.max_batch)
                agree = sum(x == y for x, y in zip(a[2], c[2]))
                rows.append((label, summarize("(c) transformers CB", work, *c)))
                print(
                    f"# {label}: (a) tokens equal (b) in {same}/{len(work)}, equal (c) in {agree}/{len(work)}"
                )
            except Exception as e:  # report, not hide, a peer that does not run here
                print(f"# {label}: transformers continuous batching failed: {type(e).__name__}: {e}")
        else:
            print(f"# {label}: (a) tokens equal (b) in {same}/{len(work)}")
    print("| arrivals | engine | tokens | wall s | tok/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['name']} | {r['tokens']} | {r['wall']:.2f} | {r['tok_s']:.0f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} |")  # fmt: skip
    for label in dict(rows):
        got = {r["name"][:3]: r for lbl, r in rows if lbl == label}
        line = f"# {label}: (a)/(b) throughput {got['(a)']['tok_s'] / got['(b)']['tok_s']:.2f}x"
        if "(c)" in got:
            line += f", (a)/(c) {got['(a)']['tok_s'] / got['(c)']['tok_s']:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
