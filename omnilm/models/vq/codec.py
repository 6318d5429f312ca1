"""A small neural audio codec: SEANet-lite conv encoder/decoder over the waveform with residual VQ.

The shape of SoundStream/EnCodec without their LSTM and adversarial losses: strided convs with ELU
and residual units down to one vector per hop (prod(strides)) samples, n_q residual codebooks, and
transposed convs back. Trained on L1 waveform loss plus a multi-resolution STFT loss (Yamamoto et al.
2020, Parallel WaveGAN) and the commitment loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioCodecConfig
from ...errors import MediaError
from .quantizers import ResidualVQ


class ResUnit(nn.Module):
    """SEANet residual unit: ELU, dilated k=3 conv, ELU, k=1 conv, plus the input."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels // 2, 3, dilation=dilation, padding=dilation)
        self.conv2 = nn.Conv1d(channels // 2, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class Downsample(nn.Module):
    """Strided conv with kernel 2*stride, padded so that L samples give exactly L / stride frames."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(cin, cout, 2 * stride, stride=stride)

    def forward(self, x):
        s = self.stride
        return self.conv(F.pad(F.elu(x), (s - s // 2, s // 2)))


class Upsample(nn.Module):
    """Transposed conv with kernel 2*stride, trimmed so that L frames give exactly L * stride samples."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride)

    def forward(self, x):
        s = self.stride
        y = self.conv(F.elu(x))  # (B, cout, (L + 1) * s)
        return y[..., s - s // 2 : y.shape[-1] - s // 2]


class CodecEncoder(nn.Module):
    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        ch = cfg.channels
        layers = [nn.Conv1d(1, ch, 7, padding=3)]
        for stride in cfg.strides:
            layers += [ResUnit(ch, 1), ResUnit(ch, 3), Downsample(ch, ch * 2, stride)]
            ch *= 2
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv1d(ch, cfg.dim, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.elu(self.layers(x)))  # (B, dim, frames)


class CodecDecoder(nn.Module):
    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        ch = cfg.channels * 2 ** len(cfg.strides)
        layers = [nn.Conv1d(cfg.dim, ch, 7, padding=3)]
        for stride in reversed(cfg.strides):
            layers += [Upsample(ch, ch // 2, stride), ResUnit(ch // 2, 1), ResUnit(ch // 2, 3)]
            ch //= 2
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv1d(ch, 1, 7, padding=3)

    def forward(self, z):
        return self.conv_out(F.elu(self.layers(z)))  # (B, 1, frames * hop)


@dataclass
class CodecOutput:
    audio: torch.Tensor
    codes: torch.Tensor  # (B, n_q, frames)
    loss: torch.Tensor
    l1: torch.Tensor
    stft: torch.Tensor
    usage: float


class AudioCodec(nn.Module):
    kind = "audio_codec"

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.config = cfg
        self.encoder = CodecEncoder(cfg)
        self.quantizer = ResidualVQ(
            cfg.n_q,
            cfg.codebook_size,
            cfg.dim,
            decay=cfg.ema_decay,
            beta=cfg.commitment_beta,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        self.decoder = CodecDecoder(cfg)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 1:
            raise MediaError(f"expected mono audio [B, 1, samples], got shape {tuple(x.shape)}")
        return F.pad(x, (0, -x.shape[-1] % self.hop_length))  # whole frames

    def forward(self, x: torch.Tensor, n_q: int | None = None, waveform_weight: float = 1.0) -> CodecOutput:
        x = self._pad(x)
        z = self.encoder(x).transpose(1, 2)  # (B, frames, dim)
        q = self.quantizer(z, n_q)
        audio = self.decoder(q.quantized.transpose(1, 2))  # (B, 1, samples)
        l1 = F.l1_loss(audio, x)
        stft = multi_resolution_stft_loss(audio.squeeze(1), x.squeeze(1))
        loss = waveform_weight * l1 + stft + q.loss
        return CodecOutput(audio, q.codes.permute(1, 0, 2), loss, l1, stft, q.usage)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Waveform (B, 1, samples) -> codes (B, n_q, ceil(samples / hop)); the tail is zero-padded."""
        p = next(self.parameters())
        z = self.encoder(self._pad(x).to(p.device, p.dtype)).transpose(1, 2)  # (B, frames, dim)
        return self.quantizer.encode(z, n_q).permute(1, 0, 2)  # (B, n_q, frames)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, n_q' <= n_q, frames) -> waveform (B, 1, frames * hop)."""
        cfg = self.config
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= cfg.n_q:
            raise MediaError(
                f"expected audio codes [B, 1..{cfg.n_q}, frames], got shape {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size):
            raise MediaError(
                f"audio codes must be in [0, {cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        z = self.quantizer.decode(
            codes.to(self.quantizer.layers[0].embed.device).permute(1, 0, 2)
        )  # (B, frames, dim)
        return self.decoder(z.transpose(1, 2))


# ---- losses and metrics ---------------------------------------------------------------------------------


def stft_magnitude(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop_length=n_fft // 4, window=window, return_complex=True)
    return spec.abs().clamp_min(
        1e-5
    )  # (B, n_fft // 2 + 1, frames); the floor keeps silent bins from dominating the log loss


def multi_resolution_stft_loss(
    pred: torch.Tensor, target: torch.Tensor, ffts=(64, 128, 256, 512)
) -> torch.Tensor:
    """Mean over FFT sizes of spectral convergence + L1 log-magnitude (pred, target: (B, samples))."""
    total = pred.new_zeros(())
    ffts = [n for n in ffts if n <= pred.shape[-1]] or [pred.shape[-1]]
    for n_fft in ffts:
        p, t = stft_magnitude(pred, n_fft), stft_magnitude(target, n_fft)
        sc = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-7)
        total = total + sc + F.l1_loss(p.log(), t.log())
    return total / len(ffts)
