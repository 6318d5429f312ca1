"""NF4 (QLoRA, Dettmers et al. 2023): 4-bit codes for the 16 quantiles of N(0, 1) scaled to [-1, 1],
one absmax scale per block of 64 weights (no double quantization). Used for frozen QLoRA bases."""

from __future__ import annotations

import torch

from ..errors import ConfigError

# the table from the paper / bitsandbytes (create_normal_map)
NF4_VALUES = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BLOCK = 64


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> codes uint8 (N*K/2,) two per byte, absmax float32 (N*K/block,)."""
    if w.numel() % block:
        raise ConfigError(f"nf4: a weight of {w.numel()} values is not a whole number of {block}-blocks")
    blocks = w.float().reshape(-1, block)
    absmax = blocks.abs().amax(-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = (blocks / absmax[:, None]).reshape(-1)
    mids = (NF4_VALUES[1:] + NF4_VALUES[:-1]).to(w.device) / 2
    codes = torch.bucketize(scaled, mids).to(torch.uint8)
    return (codes[::2] | (codes[1::2] << 4)).to(torch.uint8), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    codes = torch.stack((packed & 0xF, packed >> 4), -1).reshape(-1).long()
    values = NF4_VALUES.to(packed.device)[codes].reshape(absmax.shape[0], -1) * absmax[:, None]
    return values.reshape(shape).to(dtype)
