"""The numbers of each low-bit scheme: weight (out, in) -> stored tensors and back, in the compressed-tensors
layout (the names and dtypes vLLM and transformers read), so the in-memory module and the file hold
the same bytes.

scheme   format                 stored tensors (out = N rows, in = K columns)
int8     int-quantized          weight int8 (N, K), weight_scale (N, 1)              per-channel symmetric
         (weight-only: the file is pack-quantized, weight_packed int32 (N, K/4) + weight_shape; see
         INT8_WEIGHT_ONLY_FORMAT)
int4     pack-quantized         weight_packed int32 (N, K/8), weight_scale (N, K/G),  grouped symmetric,
                                weight_shape int64 (2,)                               8 values per int32
fp8      naive-quantized        weight float8_e4m3fn (N, K), weight_scale (N, 1)      per-channel
nvfp4    nvfp4-pack-quantized   weight_packed uint8 (N, K/2), weight_scale fp8 (N, K/16),
                                weight_global_scale fp32 (1,)                         e2m1, groups of 16
mxfp4    mxfp4-pack-quantized   weight_packed uint8 (N, K/2), weight_scale uint8 (N, K/32)  e2m1, e8m0 scales

Scales follow compressed-tensors' observer arithmetic (symmetric int: amax / ((qmax - qmin) / 2)), so a
file written here and one written by llm-compressor from the same weights agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# midpoints between neighbouring e2m1 magnitudes: bucketize gives round-to-nearest codes
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
INT4_GROUP_SIZES = (32, 64, 128)
# int-quantized is compressed-tensors' W8A8 format (its writer picks it only with input activations, and vLLM
# refuses it without them); weight-only int8 goes in files as pack-quantized with num_bits 8, as
# compressed-tensors writes it. In memory it stays the unpacked int8 `weight` (io.py packs and unpacks).
INT8_WEIGHT_ONLY_FORMAT = "pack-quantized"
# formats read besides Scheme.format: int8's weight-only file format, and fp8 W8A8 files (run weight-only here)
ALSO_READ = {"int8": (INT8_WEIGHT_ONLY_FORMAT,), "fp8": ("float-quantized",)}


@dataclass(frozen=True)
class Scheme:
    name: str
    format: str
    group_size: int | None  # None: one scale per output channel

    def args(self) -> dict:
        """compressed-tensors QuantizationArgs of the weights, as JSON."""
        base = {"symmetric": True, "dynamic": False, "group_size": self.group_size}
        if self.name == "int8":
            return {**base, "num_bits": 8, "type": "int", "strategy": "channel"}
        if self.name == "int4":
            return {**base, "num_bits": 4, "type": "int", "strategy": "group"}
        if self.name == "fp8":
            return {**base, "num_bits": 8, "type": "float", "strategy": "channel"}
        if self.name == "nvfp4":
            return {
                **base,
                "num_bits": 4,
                "type": "float",
                "strategy": "tensor_group",
                "scale_dtype": "torch.float8_e4m3fn",
            }
        return {**base, "num_bits": 4, "type": "float", "strategy": "group", "scale_dtype": "torch.uint8"}


def get_scheme(name: str, group_size: int | None = None) -> Scheme:
    if name == "int8":
        fixed = None
    elif name == "int4":
        group_size = group_size or 128
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size {group_size}: expected one of {INT4_GROUP_SIZES}")
        return Scheme("int4", "pack-quantized", group_size)
    elif name == "fp8":
        fixed = None
    elif name == "nvfp4":
        fixed = 16
    elif name == "mxfp4":
        fixed = 32
    else:
        raise ConfigError(f"unknown quantization scheme {name!r}; expected one of {', '.join(SCHEMES)}")
    if group_size is not None and group_size != fixed:
        what = f"groups of {fixed}" if fixed else "one scale per output channel"
        raise ConfigError(f"{name} has {what}; --group-size {group_size} does not apply")
    formats = {
        "int8": "int-quantized",
        "fp8": "naive-quantized",  # compressed-tensors' float-quantized is W8A8 (fp8 activations too)
        "nvfp4": "nvfp4-pack-quantized",
        "mxfp4": "mxfp4-pack-quantized",
    }
    return Scheme(name, formats[name], fixed)


SCHEMES = ("int8", "int4", "fp8", "nvfp4", "mxfp4")


def stored_shapes(scheme: Scheme, n: int, k: int, scale_dtype: torch.dtype) -> dict:
    """name -> (shape, dtype) of the tensors one (n, k) weight is stored as."""
    g = scheme.group_size
    if scheme.name == "int8":
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n, 1), scale_dtype)}
    if scheme.name == "fp8":
        return {"weight": ((n, k), FP8), "weight_scale": ((n, 1), scale_dtype)}
    if scheme.name == "int4":
        return {
            "weight_packed": ((n, k // 8), torch.int32),
            "weight_scale": ((n, k // g), scale_dtype),
            "weight_shape": ((2,), torch.int64),
        }
    if scheme.name == "nvfp4":
        return {
            "weight_packed": ((n, k // 2), torch.uint8),
            "weight_scale": ((n, k // g), FP8),
            "weight_global_scale": ((1,), torch.float32),
        }
    return {"weight_packed": ((n, k // 2), torch.uint8), "weight_scale": ((n, k // g), torch.uint8)}


def stored_bytes(scheme: Scheme, n: int, k: int, scale_dtype=torch.bfloat16) -> int:
    """Bytes of the file's tensors for one weight-only (n, k) weight."""
    packed = 4 * ((k + 3) // 4 - k // 4) * n + 16 if scheme.name == "int8" else 0  # pad + weight_shape
    return packed + sum(
        torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        for shape, dt in stored_shapes(scheme, n, k, scale_dtype).values()
    )


def check_shape(scheme: Scheme, name: str, n: int, k: int):
    g = scheme.group_size
    if g and k % g:
        raise ConfigError(f"{name}: input width {k} is not divisible by the {scheme.name} group size {g}")
    if scheme.name == "int4" and k % 8:
        raise ConfigError(f"{name}: input width {k} is not divisible by 8 (int4 packs 8 values per int32)")


# ---- quantize -----------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_weight(scheme: Scheme, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, K) float weight -> the stored tensors (scales in w's dtype, as compressed-tensors writes)."""
    n, k = w.shape
    dtype = w.dtype
    w = w.float()
    g = scheme.group_size
    if scheme.name == "int8":
        scale = _nonzero(w.abs().amax(1, keepdim=True) / 127.5)  # (N, 1)
        q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale.to(dtype)}
    if scheme.name == "fp8":
        scale = _nonzero(w.abs().amax(1, keepdim=True) / FP8_MAX)  # (N, 1)
        return {"weight": (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), "weight_scale": scale.to(dtype)}
    wg = w.reshape(n, k // g, g)  # (N, K/G, G)
    amax = wg.abs().amax(-1)  # (N, K/G)
    if scheme.name == "int4":
        scale = _nonzero(amax / 7.5).to(dtype)
        q = torch.round(wg / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).reshape(n, k)
        shape = torch.tensor([n, k], dtype=torch.int64)
        return {"weight_packed": pack_int4(q), "weight_scale": scale, "weight_shape": shape}
    if scheme.name == "nvfp4":
        # the per-tensor scale maps the largest group scale onto the fp8 range (compressed-tensors'
        # generate_gparam); stored group scales are fp8(global * amax / 6)
        global_scale = (FP8_MAX * FP4_MAX / _nonzero(w.abs().amax())).reshape(1)
        scale = (global_scale * amax / FP4_MAX).clamp(max=FP8_MAX).to(FP8)
        eff = _nonzero(scale.float() / global_scale)
        codes = fp4_encode(wg / eff[..., None]).reshape(n, k)
        return {
            "weight_packed": pack_nibbles(codes),
            "weight_scale": scale,
            "weight_global_scale": global_scale,
        }
    # mxfp4 (OCP MX): shared exponent floor(log2(amax)) - 2, where 2 is the e2m1 largest exponent
    exp = torch.floor(torch.log2(_nonzero(amax))) - 2
    exp = exp.clamp(-127, 127)
    codes = fp4_encode(wg / torch.exp2(exp)[..., None]).reshape(n, k)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": (exp + 127).to(torch.uint8)}


def dequantize_weight(scheme: Scheme, t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """The stored tensors -> the (N, K) weight they stand for."""
    g = scheme.group_size
    if scheme.name in ("int8", "fp8"):
        return (t["weight"].to(dtype) * t["weight_scale"].to(dtype)).to(dtype)
    if scheme.name == "int4":
        q = unpack_int4(t["weight_packed"])  # (N, K) int8
        n, k = q.shape
        scale = t["weight_scale"].to(dtype)
        return (q.reshape(n, k // g, g).to(dtype) * scale[..., None]).reshape(n, k)
    codes = unpack_nibbles(t["weight_packed"])  # (N, K)
    n, k = codes.shape
    values = fp4_decode(codes, dtype).reshape(n, k // g, g)
    if scheme.name == "nvfp4":
        scale = t["weight_scale"].to(torch.float32) / t["weight_global_scale"].to(torch.float32)
    else:
        scale = torch.exp2(t["weight_scale"].to(torch.float32) - 127)
    return (values * scale.to(dtype)[..., None]).reshape(n, k)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """An all-zero group gets scale 1 (its codes are 0 either way) instead of a division by zero."""
    return torch.where(x > 0, x, torch.ones_like(x))


# ---- bit packing ----------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] (N, K) -> int32 (N, K/8); value j of a word sits in bits 4j..4j+3, offset by
    8 (compressed-tensors' pack_to_int32 with num_bits=4)."""
    n, k = q.shape
    u = (q.to(torch.int32) + 8).reshape(n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    # bit 31 may be set: sum in int64, then wrap into int32's range
    words = (u.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed[..., None] >> shifts) & 0xF  # (N, K/8, 8)
    return (u - 8).to(torch.int8).reshape(n, -1)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> int32 (N, ceil(K/4)); value j of a word sits in bits 8j..8j+7, offset by 128, K padded
    with zeros (compressed-tensors' pack_to_int32 with num_bits=8)."""
    n, k = q.shape
    u = torch.nn.functional.pad(q.to(torch.int64) + 128, (0, (-k) % 4))
    words = (u.reshape(n, -1, 4) << torch.arange(0, 32, 8, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int8(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 (N, ceil(K/4)) -> int8 (N, K)."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=packed.device)
    u = (packed.to(torch.int64)[..., None] >> shifts) & 0xFF  # (N, ceil(K/4), 4)
    return (u.reshape(packed.shape[0], -1)[:, :k] - 128).to(torch.int8)


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value; codes: bit 3 = sign, bits 0-2 = index into E2M1_VALUES."""
    mag = torch.bucketize(x.abs().clamp(max=FP4_MAX), _E2M1_MIDPOINTS.to(x.device), right=False)
    return (mag | (torch.signbit(x).to(torch.int64) << 3)).to(torch.uint8)


def fp4_decode(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    values = E2M1_VALUES.to(device=codes.device, dtype=dtype)[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -values, values)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes -> (N, K/2) uint8, even column in the low nibble (compressed-tensors' pack_fp4_to_uint8)."""
    return (codes[:, ::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
