"""EnCodec (Défossez et al. 2022) as in transformers' EncodecModel, for loading Hugging Face EnCodec dirs.

Module and parameter names match `EncodecModel` exactly (`encoder.layers.N.conv...`,
`quantizer.layers.N.codebook.embed`), so a checkpoint loads with at most a rename of the weight-norm
keys (`weight_g`/`weight_v` in older files, `parametrizations.weight.original0/1` in newer ones). The
config is the config.json dict; only the fields the network needs are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, MediaError


@dataclass
class EncodecConfig:
    """The subset of transformers' EncodecConfig the network reads (same names and defaults)."""

    target_bandwidths: list[float] = field(default_factory=lambda: [1.5, 3.0, 6.0, 12.0, 24.0])
    sampling_rate: int = 24000
    audio_channels: int = 1
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: int | None = None
    use_conv_shortcut: bool = True

    def __post_init__(self):
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        if self.norm_type not in ("weight_norm", "time_group_norm"):
            raise ConfigError(
                f"encodec norm_type must be 'weight_norm' or 'time_group_norm', got {self.norm_type!r}"
            )
        if not self.causal_ok:
            raise ConfigError("encodec trim_right_ratio != 1.0 only makes sense with use_causal_conv")
        if self.num_quantizers < 1:
            raise ConfigError(
                f"encodec config gives {self.num_quantizers} quantizers (target_bandwidths "
                f"{self.target_bandwidths}, sampling_rate {self.sampling_rate}, hop {self.hop_length})"
            )

    @classmethod
    def from_hf(cls, d: dict) -> EncodecConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def causal_ok(self) -> bool:
        return self.use_causal_conv or self.trim_right_ratio == 1.0

    @property
    def hop_length(self) -> int:
        return int(math.prod(self.upsampling_ratios))

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        bits = math.ceil(math.log2(self.codebook_size))
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * bits))

    @property
    def chunk_length(self) -> int | None:
        return None if self.chunk_length_s is None else int(self.chunk_length_s * self.sampling_rate)

    @property
    def chunk_stride(self) -> int | None:
        if self.chunk_length_s is None or self.overlap is None:
            return None
        return max(1, int((1.0 - self.overlap) * self.chunk_length))

    def quantizers_for_bandwidth(self, bandwidth: float | None) -> int:
        """transformers' rule: floor(bandwidth kbps / bits per quantizer per second), at least 1."""
        if bandwidth is None or bandwidth <= 0:
            return self.num_quantizers
        bw_per_q = math.log2(self.codebook_size) * self.frame_rate
        return int(max(1, math.floor(bandwidth * 1000 / bw_per_q)))


def _weight_norm(conv: nn.Module) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(conv)


class EncodecConv1d(nn.Module):
    """Conv1d with EnCodec's padding: causal (all on the left) or centred, plus what makes the last frame whole."""

    def __init__(
        self, cfg: EncodecConfig, cin: int, cout: int, kernel_size: int, stride: int = 1, dilation: int = 1
    ):
        super().__init__()
        self.causal = cfg.use_causal_conv
        self.pad_mode = cfg.pad_mode
        self.conv = nn.Conv1d(cin, cout, kernel_size, stride, dilation=dilation)
        if cfg.norm_type == "weight_norm":
            self.conv = _weight_norm(self.conv)
        else:
            self.norm = nn.GroupNorm(1, cout)
        self.stride = stride
        self.kernel = (kernel_size - 1) * dilation + 1  # effective kernel size
        self.padding_total = self.kernel - stride

    def forward(self, x):
        length = x.shape[-1]
        n_frames = math.ceil((length - self.kernel + self.padding_total) / self.stride + 1) - 1
        extra = n_frames * self.stride + self.kernel - self.padding_total - length
        if self.causal:
            x = _pad1d(x, (self.padding_total, extra), self.pad_mode)
        else:
            right = self.padding_total // 2
            x = _pad1d(x, (self.padding_total - right, right + extra), self.pad_mode)
        x = self.conv(x)
        return self.norm(x) if hasattr(self, "norm") else x


def _pad1d(x: torch.Tensor, pads: tuple[int, int], mode: str) -> torch.Tensor:
    if mode != "reflect":
        return F.pad(x, pads, mode)
    # Reflect padding needs the input longer than the pad: zero-extend first, then cut the extension off.
    extra = max(0, max(pads) - x.shape[-1] + 1)
    x = F.pad(x, (0, extra))
    x = F.pad(x, pads, "reflect")
    return x[..., : x.shape[-1] - extra]


class EncodecConvTranspose1d(nn.Module):
    def __init__(self, cfg: EncodecConfig, cin: int, cout: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.causal = cfg.use_causal_conv
        self.trim_right_ratio = cfg.trim_right_ratio
        self.conv = nn.ConvTranspose1d(cin, cout, kernel_size, stride)
        if cfg.norm_type == "weight_norm":
            self.conv = _weight_norm(self.conv)
        else:
            self.norm = nn.GroupNorm(1, cout)
        self.padding_total = kernel_size - stride

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        # Only the fixed padding is trimmed here; the extra padding of the encoder goes with the final crop.
        right = (
            math.ceil(self.padding_total * self.trim_right_ratio) if self.causal else self.padding_total // 2
        )
        left = self.padding_total - right
        return x[..., left : x.shape[-1] - right]


class EncodecLSTM(nn.Module):
    def __init__(self, cfg: EncodecConfig, dim: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, cfg.num_lstm_layers)

    def forward(self, x):
        x = x.permute(2, 0, 1)  # (T, B, C): nn.LSTM is sequence-first
        x = self.lstm(x)[0] + x
        return x.permute(1, 2, 0)  # (B, C, T)


class EncodecResnetBlock(nn.Module):
    def __init__(self, cfg: EncodecConfig, dim: int, dilations: tuple[int, int]):
        super().__init__()
        hidden = dim // cfg.compress
        kernels = (cfg.residual_kernel_size, 1)
        # Index layout [ELU, conv, ELU, conv] as in transformers, so conv keys are block.1 and block.3.
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                EncodecConv1d(cfg, dim, hidden, kernels[0], dilation=dilations[0]),
                nn.ELU(),
                EncodecConv1d(cfg, hidden, dim, kernels[1], dilation=dilations[1]),
            ]
        )
        self.shortcut = EncodecConv1d(cfg, dim, dim, 1) if cfg.use_conv_shortcut else nn.Identity()

    def forward(self, x):
        h = x
        for layer in self.block:
            h = layer(h)
        return self.shortcut(x) + h


class EncodecEncoder(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        nf = cfg.num_filters
        layers: list[nn.Module] = [EncodecConv1d(cfg, cfg.audio_channels, nf, cfg.kernel_size)]
        scale = 1
        for ratio in reversed(cfg.upsampling_ratios):
            ch = scale * nf
            layers += [
                EncodecResnetBlock(cfg, ch, (cfg.dilation_growth_rate**j, 1))
                for j in range(cfg.num_residual_layers)
            ]
            layers += [nn.ELU(), EncodecConv1d(cfg, ch, ch * 2, kernel_size=ratio * 2, stride=ratio)]
            scale *= 2
        layers += [
            EncodecLSTM(cfg, scale * nf),
            nn.ELU(),
            EncodecConv1d(cfg, scale * nf, cfg.hidden_size, cfg.last_kernel_size),
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x  # (B, hidden_size, frames)


class EncodecDecoder(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        nf = cfg.num_filters
        scale = 2 ** len(cfg.upsampling_ratios)
        layers: list[nn.Module] = [
            EncodecConv1d(cfg, cfg.hidden_size, scale * nf, cfg.kernel_size),
            EncodecLSTM(cfg, scale * nf),
        ]
        for ratio in cfg.upsampling_ratios:
            ch = scale * nf
            layers += [
                nn.ELU(),
                EncodecConvTranspose1d(cfg, ch, ch // 2, kernel_size=ratio * 2, stride=ratio),
            ]
            layers += [
                EncodecResnetBlock(cfg, ch // 2, (cfg.dilation_growth_rate**j, 1))
                for j in range(cfg.num_residual_layers)
            ]
            scale //= 2
        layers += [nn.ELU(), EncodecConv1d(cfg, nf, cfg.audio_channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x  # (B, audio_channels, samples)


class EncodecCodebook(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        # Training-state buffers are kept only so checkpoints load strictly; inference reads `embed`.
        self.register_buffer("inited", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(cfg.codebook_size))
        self.register_buffer("embed", torch.zeros(cfg.codebook_size, cfg.codebook_dim))
        self.register_buffer("embed_avg", torch.zeros(cfg.codebook_size, cfg.codebook_dim))


class EncodecVectorQuantization(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.codebook = EncodecCodebook(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, T) -> (B, T): nearest code by Euclidean distance, computed as transformers does."""
        flat = x.permute(0, 2, 1).reshape(-1, x.shape[1])  # (B*T, D)
        embed = self.codebook.embed.t()
        # Same expression and order as transformers so ties and rounding pick the same code.
        dist = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices.view(x.shape[0], x.shape[2])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook.embed).permute(0, 2, 1)  # (B, D, T)


class EncodecResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncodecVectorQuantization(cfg) for _ in range(cfg.num_quantizers)])

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        residual, codes = x, []
        for layer in self.layers[:n_q]:
            c = layer.encode(residual)
            residual = residual - layer.decode(c)
            codes.append(c)
        return torch.stack(codes, dim=1)  # (B, n_q, frames)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = 0.0
        for i in range(codes.shape[1]):
            out = out + self.layers[i].decode(codes[:, i])
        return out  # (B, D, frames)


class EncodecCodec(nn.Module):
    """EnCodec with OmniLM's codec face: encode (B, C, samples) -> (B, n_q, frames), decode back.

    n_q comes from `bandwidth` (kbps) as in transformers; the default is the config's first target
    bandwidth, transformers' default too. Models with `normalize` (the 48 kHz one) scale each chunk to
    unit RMS before encoding; `encode` keeps those scales on `self.last_scales` and `decode` uses them
    when given `scales=`. Chunked models (`chunk_length_s`) give codes for every chunk concatenated along
    frames; decode splits them back and overlap-adds, as transformers does.
    """

    kind = "encodec"

    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.config = cfg
        self.encoder = EncodecEncoder(cfg)
        self.decoder = EncodecDecoder(cfg)
        self.quantizer = EncodecResidualVectorQuantizer(cfg)
        self.bandwidth = cfg.target_bandwidths[0]
        self.last_scales: list[torch.Tensor | None] | None = None

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def n_q(self) -> int:
        return self.config.quantizers_for_bandwidth(self.bandwidth)

    def _n_q(self, bandwidth: float | None) -> int:
        bandwidth = self.bandwidth if bandwidth is None else bandwidth
        if bandwidth not in self.config.target_bandwidths:
            raise ConfigError(
                f"bandwidth {bandwidth} is not one of this model's target_bandwidths {self.config.target_bandwidths}"
            )
        return self.config.quantizers_for_bandwidth(bandwidth)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 3 or x.shape[1] != cfg.audio_channels:
            raise MediaError(f"expected audio [B, {cfg.audio_channels}, samples], got shape {tuple(x.shape)}")
        n_q = self._n_q(bandwidth)
        p = next(self.parameters())
        x = x.to(p.device, p.dtype)
        chunk, stride = cfg.chunk_length, cfg.chunk_stride
        if chunk is None:
            chunk = stride = x.shape[-1]
        codes, scales = [], []
        for offset in range(0, x.shape[-1], stride):
            frame = x[..., offset : offset + chunk]
            scale = None
            if cfg.normalize:
                mono = frame.mean(1, keepdim=True)
                scale = mono.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8  # (B, 1, 1)
                frame = frame / scale
            codes.append(self.quantizer.encode(self.encoder(frame), n_q))
            scales.append(scale)
        self.last_scales = scales
        return torch.cat(codes, dim=-1)  # (B, n_q, frames of every chunk)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, scales: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        cfg = self.config
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= cfg.num_quantizers:
            raise MediaError(
                f"expected audio codes [B, 1..{cfg.num_quantizers}, frames], got shape {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size):
            raise MediaError(
                f"audio codes must be in [0, {cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        codes = codes.to(self.quantizer.layers[0].codebook.embed.device)
        if cfg.chunk_length is None:
            audio = self.decoder(self.quantizer.decode(codes))
            return audio if not scales or scales[0] is None else audio * scales[0].view(-1, 1, 1)
        per_chunk = math.ceil(cfg.chunk_length / cfg.hop_length)
        pieces = codes.split(per_chunk, dim=-1)
        scales = scales or [None] * len(pieces)
        frames = []
        for piece, scale in zip(pieces, scales):
            audio = self.decoder(self.quantizer.decode(piece))
            frames.append(audio if scale is None else audio * scale.view(-1, 1, 1))
        return _linear_overlap_add(frames, cfg.chunk_stride or 1)


def _linear_overlap_add(frames: list[torch.Tensor], stride: int) -> torch.Tensor:
    """transformers' overlap-add with triangular weights peaking mid-chunk."""
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    length = frames[0].shape[-1]
    t = torch.linspace(0, 1, length + 2, device=frames[0].device, dtype=frames[0].dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    out = frames[0].new_zeros(*frames[0].shape[:-1], total)
    sum_weight = frames[0].new_zeros(total)
    for i, frame in enumerate(frames):
        n = frame.shape[-1]
        out[..., i * stride : i * stride + n] += weight[:n] * frame
        sum_weight[i * stride : i * stride + n] += weight[:n]
    return out / sum_weight


def encodec_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old-style weight-norm keys (`conv.weight_g`, `conv.weight_v`) to the parametrization names."""
    out = {}
    for k, v in state.items():
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out
