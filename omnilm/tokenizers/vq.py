"""Image and audio tokenizers with the text tokenizer's face: encode(media) -> list of ids, decode(ids) -> media.

They wrap the networks in omnilm/models/vq (or an EnCodec checkpoint) and handle media in and out:
PIL images <-> [-1, 1] tensors, waveforms at any rate <-> the codec's rate. Ids are the codebook
indices, without the offsets the unified model's vocabulary adds.
- image: image_size^2 pixels -> grid_size^2 ids, row-major;
- audio: samples -> frames * n_q ids, frame-major (frame 0's n_q codes, then frame 1's, ...), the order an
  autoregressive model emits them in.
Also here: the bundled demo data and the `omnilm tokenizer train-image` / `train-audio` commands.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import AudioCodecConfig, ImageVQConfig
from ..convert.codec import load_codec, save_codec
from ..errors import ConfigError, MediaError
from ..models.vq.codec import AudioCodec
from ..models.vq.image_vqvae import ImageVQVAE
from ..training.codec import synth_tones, train_audio_codec, train_image_vq

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


# ---- images -----------------------------------------------------------------------------------------------


def image_to_tensor(image, size: int) -> torch.Tensor:
    """A PIL image, path or HxWx3 uint8 array -> (3, size, size) in [-1, 1]: center crop to square, resize."""
    from ..processing.image import load_image, to_rgb

    if isinstance(image, (str, os.PathLike, bytes)):
        image = load_image(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise MediaError(f"expected a PIL image, a path or an HxWx3 uint8 array, got {type(image).__name__}")
    image = to_rgb(image)
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    image = image.resize((size, size), Image.BICUBIC)
    a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return a.permute(2, 0, 1).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def demo_images(image_size: int = 32, n: int | None = None) -> torch.Tensor:
    """sklearn's bundled 8x8 handwritten digits (1,797), upscaled to image_size, as (N, 3, S, S) in [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images[:n].astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(digits, size=image_size, mode="bilinear", align_corners=False).clamp(0, 1)
    return (x * 2 - 1).repeat(1, 3, 1, 1)  # (N, 3, S, S)


class ImageTokenizer:
    def __init__(self, model: ImageVQVAE):
        self.model = model.eval()

    @property
    def vocab_size(self) -> int:
        return self.model.config.codebook_size

    @property
    def num_tokens(self) -> int:
        """Ids per image."""
        return self.model.config.num_tokens

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def encode(self, image) -> list[int]:
        x = image_to_tensor(image, self.image_size)[None]  # (1, 3, S, S)
        return self.model.encode(x)[0].flatten().tolist()

    def decode(self, ids) -> Image.Image:
        g = self.model.config.grid_size
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() != g * g:
            raise MediaError(f"an image is {g * g} ids ({g}x{g} codes), got {ids.numel()}")
        return tensor_to_image(self.model.decode(ids.view(1, g, g))[0])

    @classmethod
    def train(cls, images: torch.Tensor, cfg: ImageVQConfig, steps: int = 500, **kwargs):
        """Returns (tokenizer, metrics); see train_image_vq."""
        model, metrics = train_image_vq(images, cfg, steps=steps, **kwargs)
        return cls(model), metrics

    def save(self, out_dir) -> None:
        save_codec(self.model, out_dir)

    @classmethod
    def load(cls, path, device=None) -> ImageTokenizer:
        model = load_codec(path, device=device)
        if not isinstance(model, ImageVQVAE):
            raise ConfigError(f"{path}: holds a {model.kind} codec, not an image VQ-VAE")
        return cls(model)


# ---- audio ------------------------------------------------------------------------------------------------


class AudioTokenizer:
    """Wraps an AudioCodec or an EnCodec checkpoint (anything with encode/decode, sample_rate)."""

    def __init__(self, model):
        self.model = model.eval()

    @property
    def vocab_size(self) -> int:
        cfg = self.model.config
        return cfg.codebook_size

    @property
    def n_q(self) -> int:
        """Ids per frame."""
        return self.model.config.n_q if isinstance(self.model, AudioCodec) else self.model.n_q

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.model.hop_length

    def encode(self, audio, sampling_rate: int | None = None) -> list[int]:
        """A mono waveform (samples,) at sampling_rate (default: the codec's), or a path -> frame-major ids."""
        from ..processing.audio import load_audio

        if isinstance(audio, (str, os.PathLike, bytes)):
            wav = load_audio(audio, target_rate=self.sample_rate)
        else:
            wav = np.asarray(audio, dtype=np.float32)
            if wav.ndim != 1:
                raise MediaError(f"expected a mono waveform of shape (samples,), got shape {wav.shape}")
            rate = sampling_rate or self.sample_rate
            if rate != self.sample_rate:
                from scipy.signal import resample_poly

                g = np.gcd(int(rate), self.sample_rate)
                wav = resample_poly(wav, self.sample_rate // g, int(rate) // g).astype(np.float32)
        if wav.size == 0:
            raise MediaError("empty waveform (0 samples)")
        codes = self.model.encode(torch.from_numpy(np.ascontiguousarray(wav))[None, None])  # (1, n_q, frames)
        return codes[0].t().flatten().tolist()  # frame-major

    def decode(self, ids) -> np.ndarray:
        """Frame-major ids -> float32 waveform (samples,) at self.sample_rate."""
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() == 0 or ids.numel() % self.n_q:
            raise MediaError(f"audio ids come in frames of {self.n_q}; got {ids.numel()} ids")
        codes = ids.view(-1, self.n_q).t()[None]  # (1, n_q, frames)
        return self.model.decode(codes)[0, 0].float().cpu().numpy()

    @classmethod
    def train(cls, clips: torch.Tensor, cfg: AudioCodecConfig, steps: int = 500, **kwargs):
        """Returns (tokenizer, metrics); see train_audio_codec."""
        model, metrics = train_audio_codec(clips, cfg, steps=steps, **kwargs)
        return cls(model), metrics

    def save(self, out_dir) -> None:
        save_codec(self.model, out_dir)

    @classmethod
    def load(cls, path, device=None) -> AudioTokenizer:
        model = load_codec(path, device=device)
        if isinstance(model, ImageVQVAE):
            raise ConfigError(f"{path}: holds an image VQ-VAE, not an audio codec")
        return cls(model)


# ---- CLI ----------------------------------------------------------------------------------------------------


def _files(folder, suffixes, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"{folder}: no such folder of {what}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise MediaError(f"{folder}: no {what} found (looked for {', '.join(sorted(suffixes))})")
    return files


def train_image_tokenizer(out, steps: int, images=None, image_size=None, channels=None, codebook_size=None,
                          device=None, say=print) -> dict:  # fmt: skip
    """`omnilm tokenizer train-image`: a VQ-VAE on a folder of images (else the demo digits), saved
    to `out`; returns its metrics."""
    size = image_size or 32
    if images:
        folder = images
        images = torch.stack([image_to_tensor(p, size) for p in _files(folder, IMAGE_SUFFIXES, "images")])
        source = f"{len(images)} images from {folder}"
    else:
        images = demo_images(size)
        source = f"{len(images)} demo digits (sklearn), {size}x{size}"
    cfg = ImageVQConfig(
        image_size=size, channels=channels or 32, codebook_size=codebook_size or 256, code_dim=32
    )
    say(
        f"training image VQ-VAE on {source}: {cfg.grid_size}x{cfg.grid_size} codes, codebook {cfg.codebook_size}"
    )
    tok, m = ImageTokenizer.train(images, cfg, steps=steps, device=device, log_every=max(steps // 5, 1))
    tok.save(out)
    say(
        f"reconstruction PSNR {m['psnr']:.2f} dB, codebook usage {m['codebook_usage']:.1f}% "
        f"({m['steps']} steps, {m['seconds']:.1f} s); written to {out}"
    )
    return m


def train_audio_tokenizer(out, steps: int, audio=None, sample_rate=None, channels=None, clips=None,
                          device=None, say=print) -> dict:  # fmt: skip
    """`omnilm tokenizer train-audio`: a waveform codec on a folder of audio files (else synthesized
    DTMF tones), saved to `out`; returns its metrics."""
    from ..processing.audio import load_audio

    cfg = AudioCodecConfig(sample_rate=sample_rate or 16000, channels=channels or 16)
    n_clips = clips
    seconds = 0.1  # short clips: more of them per batch for the same compute
    clip = int(seconds * cfg.sample_rate)
    if audio:
        pieces = []
        for p in _files(audio, AUDIO_SUFFIXES, "audio files"):
            wav = torch.from_numpy(load_audio(p, target_rate=cfg.sample_rate))
            wav = F.pad(wav, (0, -wav.numel() % clip))
            pieces.append(wav.view(-1, clip))  # (n, clip): cut into equal clips
        clips = torch.cat(pieces)[:, None]
        source = f"{len(clips)} clips of {seconds} s from {audio}"
    else:
        clips = synth_tones(n_clips or 64, sample_rate=cfg.sample_rate, seconds=seconds)
        source = f"{len(clips)} synthesized DTMF tone clips of {seconds} s"
    say(
        f"training audio codec on {source}: {cfg.n_q} codebooks of {cfg.codebook_size}, "
        f"{cfg.sample_rate / cfg.hop_length:g} frames/s"
    )
    tok, m = AudioTokenizer.train(
        clips,
        cfg,
        steps=steps,
        device=device,
        lr=3e-3,
        log_every=max(steps // 5, 1),
    )
    tok.save(out)
    say(
        f"SI-SNR {m['si_snr']:.2f} dB, codebook usage {m['codebook_usage']:.1f}% "
        f"({m['steps']} steps, {m['seconds']:.1f} s); written to {out}"
    )
    return m
