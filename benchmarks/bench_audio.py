"""Whisper encoder throughput, front end included: OmniLM vs transformers, same weights, same run.

Seconds of audio encoded per second of wall time, for a batch of 30 s clips going from raw 16 kHz
waveforms (NumPy, on the host) to the encoder's last hidden state on the device:
  omnilm:       waveform -> device -> LogMel (torch, on device) -> WhisperEncoder
  transformers: WhisperFeatureExtractor(device=...) -> input_features -> device -> WhisperModel.encoder

    python benchmarks/bench_audio.py                      # CUDA: whisper-small and whisper-large-v3 shapes, bf16
    python benchmarks/bench_audio.py --small --device cpu # CPU: whisper-tiny shape, fp32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from omnilm.convert.audio import audio_config_from_hf, encoder_state_from_hf
from omnilm.models.audio import LogMel, build_audio_tower

SR, WINDOW = 16000, 30.0

# Encoder shapes from the openai/whisper-* config.json files on the Hugging Face hub.
SHAPES = {
    "whisper-tiny": dict(
        d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80
    ),
    "whisper-small": dict(
        d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072, num_mel_bins=80
    ),
    "whisper-large-v3": dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128
    ),
}


def clips(batch: int, seed: int = 0) -> list[np.ndarray]:
    """Speech-like 30 s clips: a gliding harmonic voice, syllable envelope, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(WINDOW * SR)) / SR
    out = []
    for _ in range(batch):
        f0 = rng.uniform(90, 220) + 40 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)
        phase = 2 * np.pi * np.cumsum(f0) / SR
        voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
        out.append((0.3 * voice + 0.02 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def build(name: str, device, dtype):
    hf_cfg = WhisperConfig(
        **SHAPES[name],
        max_source_positions=1500,
        decoder_layers=1,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = HFWhisperEncoder(hf_cfg).eval()
    hf_dict = hf_cfg.to_dict()
    ours = build_audio_tower(audio_config_from_hf(hf_dict)).eval()
    state = encoder_state_from_hf({"encoder." + k: v for k, v in theirs.state_dict().items()}, hf_dict)
    ours.load_state_dict(state, strict=True)
    return ours.to(device, dtype), theirs.to(device, dtype), hf_cfg.num_mel_bins


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fns, device, warmup: int, iters: int) -> list[float]:
    """Mean seconds per call of each fn; calls interleave so load from other processes hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    totals = [0.0] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            totals[i] += time.perf_counter() - t0
    return [t / iters for t in totals]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--small", action="store_true", help="whisper-tiny shape only (for CPU)")
    ap.add_argument("--models", nargs="*", default=None, help=f"any of {', '.join(SHAPES)}")
    ap.add_argument("--batch", type=int, default=None, help="30 s clips per call (default 16 CUDA, 2 CPU)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    cuda = torch.device(args.device).type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    models = args.models or (["whisper-tiny"] if args.small else ["whisper-small", "whisper-large-v3"])
    batch = args.batch or (16 if cuda else 2)
    iters = args.iters or (10 if cuda else 3)
    audio = clips(batch)
    torch.set_grad_enabled(False)

    print(
        f"device {args.device}, dtype {str(dtype).removeprefix('torch.')}, batch {batch} x {WINDOW:g} s, {iters} iters"
    )
    print("| model | omnilm audio s/s | transformers audio s/s | speedup | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        print(bench_one(name, args.device, dtype, audio, args.warmup, iters))
        if cuda:
            torch.cuda.empty_cache()


def bench_one(name: str, device, dtype, audio: list[np.ndarray], warmup: int, iters: int) -> str:
    ours, theirs, n_mels = build(name, device, dtype)
    logmel = LogMel(n_mels).to(device)
    fe = WhisperFeatureExtractor(feature_size=n_mels)

    def run_ours():
        wav = torch.from_numpy(np.stack(audio)).to(device, non_blocking=True)  # (B, 480000)
        return ours(logmel(wav).to(dtype))  # (B, 1500, D)

    def run_theirs():
        feats = fe(audio, sampling_rate=SR, return_tensors="pt", device=device)["input_features"]
        return theirs(feats.to(device, dtype)).last_hidden_state

    def front_ours():
        return logmel(torch.from_numpy(np.stack(audio)).to(device, non_blocking=True))

    def front_theirs():
        return fe(audio, sampling_rate=SR, return_tensors="pt", device=device)["input_features"].to(device)

    diff = (run_ours().float() - run_theirs().float()).abs().max().item()
    front_diff = (front_ours() - front_theirs()).abs().max().item()
    t = timeit([run_ours, run_theirs, front_ours, front_theirs], device, warmup, iters)
    secs = len(audio) * WINDOW
    return (
        f"| {name} | {secs / t[0]:,.1f} | {secs / t[1]:,.1f} | {t[1] / t[0]:.2f}x | {diff:.2e} |\n"
        f"| {name}, front end only | {secs / t[2]:,.0f} | {secs / t[3]:,.0f} | {t[3] / t[2]:.2f}x | {front_diff:.2e} |"
    )


if __name__ == "__main__":
    main()
