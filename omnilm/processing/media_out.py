"""Media out: the image/audio spans in generated ids decoded back to PIL images and waveforms.

A model directory keeps the tokenizers its codes come from in image_tokenizer/ and audio_tokenizer/
(written by ImageTokenizer.save / AudioTokenizer.save); decode_media turns generated spans back
into PIL images and waveforms with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, MediaError


@dataclass
class Span:
    modality: str  # "image" | "audio"
    codes: torch.Tensor  # image: (h, w); audio: (n_q, frames); codec-local ids


def find_spans(cfg, ids) -> list[Span]:
    """Complete spans (start marker, the exact number of codes, end marker) in one row of ids, in order."""
    ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
    spans, i = [], 0
    while i < len(ids):
        kind = None
        if ids[i] == cfg.image_start_id and cfg.tokens_per_image:
            kind, n, lo, hi, end = (
                "image",
                cfg.tokens_per_image,
                cfg.image_offset,
                cfg.audio_offset,
                cfg.image_end_id,
            )
        elif ids[i] == cfg.audio_start_id and cfg.tokens_per_audio:
            kind, n, lo, hi, end = (
                "audio",
                cfg.tokens_per_audio,
                cfg.audio_offset,
                cfg.vocab_size,
                cfg.audio_end_id,
            )
        if kind is not None:
            body = ids[i + 1 : i + 1 + n]
            if len(body) == n and all(lo <= t < hi for t in body) and ids[i + 1 + n : i + 2 + n] == [end]:
                codes = torch.tensor(body) - lo
                if kind == "image":
                    codes = codes.view(cfg.image_grid, cfg.image_grid)
                else:  # frame-major: each frame's residual codes are consecutive
                    codes = codes.view(cfg.audio_frames, cfg.audio_codebooks).T.contiguous()
                spans.append(Span(kind, codes))
                i += n + 2
                continue
        i += 1
    return spans


def decode_media(model_or_cfg, ids, image_tokenizer=None, audio_tokenizer=None, model_dir=None):
    """Find the complete image/audio spans in generated ids (T,) or (B, T) and decode them.

    Returns (images, waves): PIL images and (waveform float32 (samples,), sample_rate) pairs, in the
    order their spans appear. A tokenizer is an ImageTokenizer / AudioTokenizer (omnilm/tokenizers/vq.py,
    flat ids in) or a network from omnilm.load_codec (codes (1, h, w) / (1, n_q, frames) in); one not
    given is loaded from model_dir/image_tokenizer or model_dir/audio_tokenizer when a span needs it.
    A span whose tokenizer cannot be found raises MediaError.
    """
    cfg = getattr(getattr(model_or_cfg, "config", None), "discrete", None) or getattr(
        model_or_cfg, "discrete", None
    )
    cfg = cfg or model_or_cfg
    if not hasattr(cfg, "tokens_per_image"):
        raise ConfigError("decode_media needs a discrete model, ModelConfig or DiscreteConfig")
    ids = torch.as_tensor(ids)
    rows = ids[None] if ids.dim() == 1 else ids
    tokenizers = {"image": image_tokenizer, "audio": audio_tokenizer}
    images, waves = [], []
    for row in rows:
        for span in find_spans(cfg, row):
            tok = tokenizers[span.modality]
            if tok is None:
                tok = tokenizers[span.modality] = _load_media_tokenizer(model_dir, span.modality)
            if isinstance(tok, torch.nn.Module):  # a bare codec network: codes tensors
                with torch.no_grad():
                    out = tok.decode(span.codes[None])
            elif span.modality == "image":  # a tokenizer wrapper: flat ids (row-major)
                out = tok.decode(span.codes.flatten().tolist())
            else:  # frame-major: each frame's residual codes consecutive
                out = tok.decode(span.codes.T.flatten().tolist())
            if span.modality == "image":
                images.append(_to_pil(out))
            else:
                wave = torch.as_tensor(out).detach().float().cpu().reshape(-1).numpy()
                waves.append((wave, int(tok.sample_rate)))
    return images, waves


def _to_pil(decoded):
    from PIL import Image

    if isinstance(decoded, Image.Image):
        return decoded
    x = torch.as_tensor(decoded).detach().float().cpu()
    x = x[0] if x.dim() == 4 else x  # (3, H, W) in [-1, 1]
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(pixels.numpy())


def _load_media_tokenizer(model_dir, modality: str):
    from pathlib import Path

    sub = Path(model_dir) / f"{modality}_tokenizer" if model_dir is not None else None
    if sub is None or not sub.is_dir():
        where = f" and {sub} does not exist" if sub is not None else ""
        raise MediaError(
            f"the generated tokens hold an {modality} span but no {modality} tokenizer was given{where}"
        )
    from ..tokenizers.vq import AudioTokenizer, ImageTokenizer

    return (ImageTokenizer if modality == "image" else AudioTokenizer).load(sub)
