"""Mllama generation, OmniLM against transformers: same random weights (gates moved off 0), one process.

    python benchmarks/bench_mllama.py --small --device cpu     # CPU, fp32, a small Mllama shape
    python benchmarks/bench_mllama.py --device cuda            # GPU, bf16, the 11B text shape cut to 8 layers

A prompt of <|image|> plus text and one image of 1 or 4 tiles; both libraries generate greedily with
their KV cache (OmniLM keeps the images' cross-attention k/v from the prefill, transformers keeps them
in its cache layers), exactly --new tokens (no eos).

- prefill ms: time(prompt + 1 new token): vision encoder, projector, image k/v and the prompt;
- decode ms/token: (time(prompt + N new) - time(prompt + 1 new)) / (N - 1);
- decode 4-tile / 1-tile: must stay ~1 (the image is not re-encoded per step, and its k/v are read
  from the cache; transformers and OmniLM both pad every image to max_num_tiles tiles).
Every number is the best of --repeats runs, the two libraries interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

import omnilm

SUPPORTED = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


def hf_config(small: bool) -> transformers.MllamaConfig:
    if small:  # ~20M parameters: text d 256 x 8 layers (2 cross), vision d 128 x (4 + 2) layers, 112-px tiles
        vision = dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_global_layers=2,
            attention_heads=4,
            image_size=112,
            patch_size=14,
            intermediate_layers_indices=[1, 3],
            vision_output_dim=384,
        )
        text = dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=[3, 7],
        )
        image_token = 4096
    else:  # Llama-3.2-11B-Vision's shapes with the text model cut to 8 layers (2 cross) and 8 vision layers
        vision = dict(
            num_hidden_layers=6,
            num_global_layers=2,
            image_size=560,
            intermediate_layers_indices=[1, 3, 5],
            vision_output_dim=1280 * 4,
        )
        text = dict(num_hidden_layers=8, cross_attention_layers=[3, 7])
        image_token = 128256
    text.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token)


def perturb_gates(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in (
                "gate",
                "gate_attn",
                "gate_ffn",
                "cross_attn_attn_gate",
                "cross_attn_mlp_gate",
            ):
                p.fill_(0.5)


def inputs(cfg, tiles: int, prompt_len: int, device, dtype):
    from omnilm.processing.mllama import cross_attention_mask

    v = cfg.vision_config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.text_config.vocab_size, (1, prompt_len), generator=g)
    ids[0, 0], ids[0, 1] = 1, cfg.image_token_index
    pv = torch.zeros(1, 1, v.max_num_tiles, 3, v.image_size, v.image_size)
    pv[0, 0, :tiles] = torch.randn(tiles, 3, v.image_size, v.image_size, generator=g)
    ratio = {1: [1, 1], 2: [1, 2], 4: [2, 2]}[tiles]
    mask = torch.zeros(1, 1, v.max_num_tiles, dtype=torch.long)
    mask[0, 0, :tiles] = 1
    cam = cross_attention_mask(ids.tolist(), [[tiles]], cfg.image_token_index, v.max_num_tiles, prompt_len)
    return dict(
        input_ids=ids.to(device),
        pixel_values=pv.to(device, dtype),
        aspect_ratio_ids=torch.tensor([[SUPPORTED.index(ratio) + 1]], device=device),
        aspect_ratio_mask=mask.to(device),
        cross_attention_mask=cam.to(device),
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best(fns: dict, device, repeats: int) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    out = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            out[name] = min(out[name], time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = hf_config(args.small)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: the CPU would take minutes at 11B widths
        hf = transformers.MllamaForConditionalGeneration(cfg).to(dtype)
    perturb_gates(hf)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        del hf
        hf = transformers.MllamaForConditionalGeneration.from_pretrained(d, dtype=dtype).to(device).eval()
        ours = omnilm.load(d, device=device, dtype=dtype)

    def run_ours(x, n):
        return lambda: ours.generate(**x, max_new_tokens=n, eos_token_id=[])

    def run_hf(x, n):
        return lambda: hf.generate(
            **x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
        )

    print(
        f"device {device}, {dtype}, prompt {args.prompt_len} tokens, {args.new} new tokens, best of {args.repeats}"
    )
    print("| tiles | impl | prefill ms | decode ms/token | tokens equal |")
    print("|---:|---|---:|---:|---|")
    decode, fns, same = {}, {}, {}
    with torch.inference_mode():
        for tiles in (1, 4):  # every configuration in one interleaved round, so load hits all alike
            x = inputs(cfg, tiles, args.prompt_len, device, dtype)
            same[tiles] = run_ours(x, args.new)().tolist() == run_hf(x, args.new)().tolist()
            for key, run in (("ours", run_ours), ("hf", run_hf)):
                fns[(tiles, key, 1)] = run(x, 1)
                fns[(tiles, key, args.new)] = run(x, args.new)
        t = best(fns, device, args.repeats)
    for tiles in (1, 4):
        for impl, key in (("OmniLM", "ours"), ("transformers", "hf")):
            per_token = (t[(tiles, key, args.new)] - t[(tiles, key, 1)]) / (args.new - 1)
            decode[(tiles, impl)] = per_token
            print(
                f"| {tiles} | {impl} | {t[(tiles, key, 1)] * 1e3:.1f} | {per_token * 1e3:.2f} | {same[tiles]} |"
            )
    for impl in ("OmniLM", "transformers"):
        print(f"{impl}: decode 4-tile / 1-tile = {decode[(4, impl)] / decode[(1, impl)]:.2f}")
    for tiles in (1, 4):
        ratio = decode[(tiles, "transformers")] / decode[(tiles, "OmniLM")]
        print(f"{tiles} tile(s): OmniLM decode speed / transformers = {ratio:.2f}x")


if __name__ == "__main__":
    main()
