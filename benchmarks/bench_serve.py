"""Serving under concurrent clients: `omnilm serve` against `transformers serve` on one checkpoint.

    python benchmarks/bench_serve.py [--model DIR] [--clients 1 4 16 64] [--max-tokens 32] [--device cpu]

Without --model a small random Llama (transformers' LlamaForCausalLM, OmniLM's tokenizer and a Llama-3
shaped chat template) is written to a temporary directory, so both servers read the same files.
Each level starts `clients` streaming chat requests at once (each client `--requests` in a row) and
reports completion tokens/s over the level's wall time (tokens from the usage chunk), p50/p99 time to
first token and of each request's mean inter-token latency. A server that does not start (transformers
serve needs its extras) is reported, not fatal. Levels run interleaved (for each round, each client
count, each server), and the table gives medians over --rounds with the tokens/s range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


SERVER_CPUS: set[int] = set()  # --pin: the servers run here, this process (the clients) elsewhere
FAILURES: list[str] = []  # why requests failed, the first few printed with the table


def make_checkpoint(out: Path, hidden=256, layers=4) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from omnilm.tokenizers.text import ASSET_DIR

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # away from init, so the output is not one repeated token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ASSET_DIR / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|end_of_text|>", pad_token="<|pad|>")  # fmt: skip
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held together while chosen, so no two servers are handed the same one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(cmd, port, threads=None, timeout=180):
    # Each server's own default thread count unless told: omnilm serve leaves a core to its HTTP front
    # end; transformers serve takes torch's default. The peer also runs with one thread (a row of its
    # own) and the ratios take its better figure, so no setting of ours handicaps it.
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    # the log goes to a file: a pipe nobody reads fills up and stalls a chatty server mid-run
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, SERVER_CPUS)) if SERVER_CPUS else None)  # fmt: skip
    proc.log = log  # read back if the server dies during the run
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            log.seek(0)
            return proc, f"exited: {log.read()[-300:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, None
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return proc, "did not answer /health"


async def one_request(session, url, model, max_tokens, prompt):
    import aiohttp

    try:
        return await _one_request(session, url, model, max_tokens, prompt)
    except (
        aiohttp.ClientError,
        asyncio.TimeoutError,
    ) as e:  # a dropped connection counts as a failed request
        FAILURES.append(f"{type(e).__name__}: {e}")
        return None


async def _one_request(session, url, model, max_tokens, prompt):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps, usage = [], None
    async with session.post(url, json=body) as r:
        if r.status != 200:
            FAILURES.append(f"HTTP {r.status}: {(await r.read())[:200]!r}")
            return None
        async for line in r.content:  # SSE lines
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        return {"tokens": 0, "ttft": None, "itl": None}
    # A server may send several tokens in one chunk: count tokens by the usage chunk when there is one,
    # and take inter-token latency per request, (last chunk - first chunk) / (tokens - 1).
    tokens = (usage or {}).get("completion_tokens") or len(stamps)
    itl = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None
    return {"tokens": tokens, "ttft": stamps[0] - t0, "itl": itl}


async def level(base, model, clients, requests, max_tokens):
    # aiohttp, as vLLM's serving benchmark uses: httpx spent ~160 us of client CPU per streamed token
    # against aiohttp's ~40, CPU the servers under test share on a small machine
    import aiohttp

    url = base + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def worker(i):
            return [await one_request(session, url, model, max_tokens, f"tell me a story number {i}-{k}")
                    for k in range(requests)]  # fmt: skip

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r is not None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [r["itl"] for r in ok if r["itl"] is not None]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"tok_s": tokens / wall, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50),
            "itl99": pct(itl, 99), "failed": len(results) - len(ok)}  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians and ranges reported")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=16, help="omnilm serve --max-batch")
    ap.add_argument("--servers", nargs="+", default=["omnilm", "transformers", "transformers-1t"],
                    help="a suffix -Nt runs that server with OMP_NUM_THREADS=N (transformers-1t, omnilm-2t); "
                         "omnilm-thread serves with the engine in a thread beside HTTP (--engine thread)")  # fmt: skip
    ap.add_argument("--pin", action="store_true",
                    help="servers on the first CPU, clients on the others: each server's cost alone, not shared with the clients")  # fmt: skip
    args = ap.parse_args()
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        SERVER_CPUS.update(cpus[:1])
        os.sched_setaffinity(0, cpus[1:])

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else make_checkpoint(Path(tmp.name) / "llama")
    exe = Path(sys.executable).parent
    runs = {}  # (server, clients) -> one result per round

    def command(name, port):
        if name.startswith("omnilm"):
            engine = (
                ["--engine", "thread"] if "-thread" in name else []
            )  # omnilm-thread: the engine beside HTTP
            return [sys.executable, "-m", "omnilm", "serve", "--model", str(model_dir), "--port", str(port),
                    "--device", args.device, "--max-queue", "256", "--max-batch", str(args.max_batch), *engine], model_dir.name  # fmt: skip
        return [str(exe / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                "--continuous-batching", "--device", args.device], str(model_dir)  # fmt: skip

    # One server up at a time (transformers serve sizes its KV cache from the free memory, so two at once
    # end in the OOM killer), servers interleaved within each round: load from other jobs drifts, and
    # the rounds spread it over every server alike.
    for k in range(args.rounds):
        for name in args.servers:
            port = free_ports(1)[0]
            cmd, served = command(name, port)
            threads = re.fullmatch(r".*-(\d+)t", name)
            proc, problem = start(cmd, port, int(threads[1]) if threads else None)
            try:
                if problem:
                    print(f"{name}: not measured ({problem.strip()})")
                    continue
                base = f"http://127.0.0.1:{port}"
                asyncio.run(level(base, served, 1, 1, 4))  # warm-up
                for c in args.clients:
                    r = asyncio.run(level(base, served, c, args.requests, args.max_tokens))
                    runs.setdefault((name, c), []).append(r)
                    print(f"round {k} {name} clients={c}: {r}", flush=True)
            finally:
                if proc.poll() is not None:
                    proc.log.seek(0)
                    print(f"{name} exited during the run ({proc.returncode}): {proc.log.read()[-600:]}")
                proc.terminate()
                proc.wait(30)
    rows = [(name, c, {key: float(np.median([r[key] for r in rs])) for key in rs[0]}, [r["tok_s"] for r in rs])
            for (name, c), rs in runs.items()]  # fmt: skip

    print(f"\nmedians of {args.rounds} interleaved rounds; tok/s range in brackets")
    print(
        "| server | clients | completion tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, c, r, all_tok in sorted(rows, key=lambda row: (row[1], row[0])):
        print(f"| {name} | {c} | {r['tok_s']:.0f} ({min(all_tok):.0f}-{max(all_tok):.0f}) | {r['ttft50']:.0f} | "
              f"{r['ttft99']:.0f} | {r['itl50']:.1f} | {r['itl99']:.1f} | {r['failed']:.0f} |")  # fmt: skip
    for c in args.clients:
        got = {n: r["tok_s"] for n, cc, r, _ in rows if cc == c}
        peers = {n: v for n, v in got.items() if n.startswith("transformers") and v}
        if "omnilm" in got and peers:
            best = max(peers, key=peers.get)
            print(f"clients={c}: omnilm / {best} (the better peer) = {got['omnilm'] / peers[best]:.2f}x")
    for why in sorted(set(FAILURES))[:5]:
        print(f"failed request: {why}")
    one = {n: r["tok_s"] for n, cc, r, _ in rows if cc == 1}
    for n, c, r, _ in rows:
        if c == 16 and one.get(n):
            print(f"{n}: 16 clients / 1 client throughput = {r['tok_s'] / one[n]:.2f}x")


if __name__ == "__main__":
    main()
