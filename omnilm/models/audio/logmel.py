"""Whisper's log-mel front end in torch: batched, and on whatever device the waveform is on.

Matches `WhisperFeatureExtractor` (and OpenAI's `log_mel_spectrogram`): 25 ms Hann windows (n_fft 400)
every 10 ms (hop 160) at 16 kHz, power spectrum, Slaney mel filters over 0-8 kHz, log10 clamped at
1e-10, values floored at (clip max - 8) and rescaled as (x + 4) / 4, on a clip padded or trimmed to
30 s (3000 frames).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels = np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mels)
    return mels


def mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    return np.where(log_region, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filter_bank(
    n_mels: int, n_fft: int = 400, sampling_rate: int = 16000, f_min: float = 0.0, f_max: float = 8000.0
) -> np.ndarray:
    """Slaney-normalised triangular filters, (n_fft // 2 + 1, n_mels) float64, as transformers builds them."""
    n_freqs = n_fft // 2 + 1
    filter_freqs = mel_to_hertz(
        np.linspace(hertz_to_mel(f_min), hertz_to_mel(f_max), n_mels + 2)
    )  # (n_mels + 2,)
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)  # (n_freqs,)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))  # (n_freqs, n_mels)
    # Slaney normalisation: each filter has unit area, so energy per channel is roughly constant
    filters *= (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]
    return filters


class LogMel(nn.Module):
    """(B, samples) float waveform at 16 kHz -> (B, n_mels, n_frames) Whisper input features (fp32)."""

    def __init__(
        self,
        n_mels: int = 80,
        n_fft: int = 400,
        hop_length: int = 160,
        sampling_rate: int = 16000,
        chunk_seconds: float = 30.0,
    ):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.n_samples = int(round(chunk_seconds * sampling_rate))
        self.n_frames = self.n_samples // hop_length
        filters = mel_filter_bank(n_mels, n_fft, sampling_rate, 0.0, 8000.0)  # Whisper: 0-8 kHz at any rate
        # Buffers, not parameters: fixed by the recipe, rebuilt on load, kept in fp32 whatever the model dtype.
        self.register_buffer(
            "mel_filters", torch.from_numpy(filters.T.astype(np.float32)), persistent=False
        )  # (n_mels, n_freqs)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def pad_or_trim(self, waveform: torch.Tensor) -> torch.Tensor:
        """Zero-pad or cut the last axis to exactly one chunk (30 s)."""
        n = waveform.shape[-1]
        if n > self.n_samples:
            return waveform[..., : self.n_samples]
        return nn.functional.pad(waveform, (0, self.n_samples - n))

    def forward(self, waveform: torch.Tensor, pad: bool = True) -> torch.Tensor:
        if waveform.dim() == 1:
            waveform = waveform[None]
        x = waveform.float()
        if pad:
            x = self.pad_or_trim(x)  # (B, n_samples)
        stft = torch.stft(
            x,
            self.n_fft,
            self.hop_length,
            window=self.window.float(),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (B, n_freqs, n_frames + 1)
        power = stft[..., :-1].abs().pow(2).contiguous()  # the last (centred) frame is dropped, as in Whisper
        mel = torch.matmul(self.mel_filters.float(), power)  # (B, n_mels, n_frames)
        log_spec = mel.clamp(min=1e-10).log10()
        # dynamic range of 80 dB per clip: nothing more than 8 decades below the clip's loudest bin
        peak = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0
