"""Vision tower throughput: OmniLM vs transformers' SiglipVisionModel, same weights, same run.

Images per second from pixel_values already on the device to the tower's last hidden state, for
SigLIP-so400m and ViT-L/16 (SigLIP-large) shapes at 224 and 384 px. The OmniLM tower gets the
transformers model's weights through the production converter (tower_state_from_hf + load_strict),
and the two outputs are compared before timing.

    python benchmarks/bench_vision.py                                  # CUDA: full depth, bf16, batch 32
    python benchmarks/bench_vision.py --device cpu --layers 2 --batch 2 # CPU: fp32, two blocks per tower
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from omnilm.convert.hf import load_strict
from omnilm.convert.vision import tower_state_from_hf, vision_config_from_hf
from omnilm.models.vision import VisionTower

# Shapes from the google/siglip-so400m-patch14-{224,384} and google/siglip-large-patch16-{256,384}
# config.json files on the Hugging Face hub (the large tower is a ViT-L/16).
SHAPES = {
    "siglip-so400m": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14
    ),
    "vit-l/16": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=16
    ),
}


def build(name: str, image_size: int, layers: int | None, device, dtype):
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    hf_cfg = SiglipVisionConfig(**shape, image_size=image_size, vision_use_head=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = SiglipVisionModel(hf_cfg).eval()
    cfg = vision_config_from_hf(hf_cfg.to_dict())
    ours = VisionTower(cfg).eval()
    load_strict(ours, tower_state_from_hf(theirs.state_dict()), source=name)
    return ours.to(device, dtype), theirs.to(device, dtype), cfg.num_patches


def images_per_second(fn, x, iters: int, device) -> float:
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels chosen, caches filled
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 2 on CPU")
    p.add_argument("--layers", type=int, default=None, help="blocks per tower (default: the real depth)")
    p.add_argument("--iters", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--compile", action="store_true", help="torch.compile both towers")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    batch = args.batch or (32 if cuda else 2)
    iters = args.iters or (20 if cuda else 3)
    torch.set_grad_enabled(False)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; dtype {dtype}; batch {batch}; layers {args.layers or 'full'}; iters {iters}; "
        f"compile {args.compile}; torch {torch.__version__}"
    )
    print(
        "| tower | px | tokens | layers | transformers img/s | OmniLM img/s | OmniLM / transformers | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for px in (int(s) for s in args.sizes.split(",")):
            ours, theirs, tokens = build(model_name, px, args.layers, device, dtype)
            x = torch.randn(batch, 3, px, px, device=device, dtype=dtype)
            with torch.inference_mode():
                diff = (ours(x).float() - theirs(pixel_values=x).last_hidden_state.float()).abs().max().item()

            def run_ours(x, f=ours):
                return f(x)

            def run_theirs(x, f=theirs):
                return f(pixel_values=x).last_hidden_state

            if args.compile:
                run_ours, run_theirs = torch.compile(run_ours), torch.compile(run_theirs)
            hf_ips = images_per_second(run_theirs, x, iters, device)
            om_ips = images_per_second(run_ours, x, iters, device)
            layers = len(ours.encoder.layers)
            print(
                f"| {model_name} | {px} | {tokens} | {layers} | {hf_ips:.1f} | {om_ips:.1f} | {om_ips / hf_ips:.2f}x | {diff:.1e} |"
            )
            del ours, theirs, x
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
