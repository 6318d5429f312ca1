"""QuantLinear and the module swap that puts it where nn.Linear was (gpt-fast / torchao style: the model
code never changes).

A QuantLinear holds exactly the tensors of its compressed-tensors file entry (formats.py), under the same
names, so `state_dict()` is the file and loading is `load_state_dict(assign=True)`. fp8 tensors are
kept as their uint8 bits in memory (a `.to(torch.bfloat16)` of the model must move them, never
re-encode them) and viewed back as float8_e4m3fn in the state dict.

Matmul paths (`QuantLinear.path` says which one ran last):
- int8 on CPU: torch.ops.aten._weight_int8pack_mm (weight-only, per-channel scales);
- int4 on CPU: _weight_int4pack_mm_for_cpu on a layout prepared once per device/dtype; on CUDA the
  tinygemm kernel _weight_int4pack_mm (bf16);
- fp8 on CUDA with compute capability >= 8.9: torch._scaled_mm with row-wise scales (activations
  quantized per token on the fly);
- int8 with dynamic int8 activations (`activations="int8"`, the W8A8 of compressed-tensors) on CPU:
  fbgemm's dynamic linear (torch.ops.quantized.linear_dynamic over a per-channel int8 weight packed once
  per device into `_kernel_cache`; path "fbgemm_w8a8"). It quantizes its float32 input to uint8 inside
  the op with one affine scale per call; more than one row is first divided by each row's amax (and the
  output multiplied back), so every token still gets its own scale. Why this kernel: at batch-1 decode it
  is the fastest int8 GEMV PyTorch ships for CPU (1.9x bf16 on the 155M shape's linears, 1 thread;
  torch._int_mm runs ~6 GB/s at M=1, oneDNN's qlinear_pointwise 1.45x). Its price is PyTorch's
  quantized-tensor API, deprecated in torch 2.13 (pytorch#184982; the one warning it raises is silenced
  at prepack). When it is removed, or where fbgemm is not the quantized engine, the prepack fails and
  the layer uses torch._int_mm (int8 x int8 -> int32, oneDNN) with symmetric per-token activation scales
  (path "int_mm_w8a8"), the weight's (N, K) rows read as a column-major (K, N), the layout that kernel
  runs fastest;
- everything else (fp8 on CPU, nvfp4, mxfp4, shapes a kernel refuses): the weight is dequantized on the
  fly and multiplied in the activation dtype ("emulated"; FP4 tensor cores need Blackwell).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from .formats import FP8, Scheme, check_shape, dequantize_weight, get_scheme, quantize_weight, stored_shapes

# the parts of a model whose linears are quantized by default; encoders only when asked
DECODER_SCOPE = ("language_model.model.",)
ENCODER_SCOPE = ("vision_tower.", "multi_modal_projector.", "audio_tower.", "audio_projector.")


class QuantLinear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, scheme: Scheme, scale_dtype=None, device=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self._fp8_names = []
        for name, (shape, dtype) in stored_shapes(
            scheme, out_features, in_features, scale_dtype or torch.float32
        ).items():
            if dtype == FP8:
                self._fp8_names.append(name)
                dtype = torch.uint8
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict = {}
        self.path = None
        self.activations = None  # "int8": dynamic per-token int8 activations (int8 weights only)
        self.register_state_dict_post_hook(_fp8_views)
        self.register_load_state_dict_pre_hook(_from_file)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> QuantLinear:
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, w.dtype, "meta")
        for name, t in quantize_weight(scheme, w).items():
            setattr(m, name, (t.view(torch.uint8) if t.dtype == FP8 else t).to(w.device))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors as the file holds them (fp8 where the format says fp8)."""
        names = stored_shapes(self.scheme, self.out_features, self.in_features, torch.float32)
        return {n: getattr(self, n).view(FP8) if n in self._fp8_names else getattr(self, n) for n in names}

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_weight(self.scheme, self.stored(), dtype)

    def _apply(self, fn, recurse=True):
        self._kernel_cache = {}  # prepared layouts belong to the old device/dtype
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = None
        if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            name = self.scheme.name
            if self.activations == "int8" and x.device.type == "cpu":
                y = self._w8a8(x2)
            elif name == "int8" and x.device.type == "cpu":
                scale = self.weight_scale.reshape(-1).to(x.dtype)
                y, self.path = (
                    torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, scale),
                    "int8pack",
                )
            elif name == "int4":
                y = self._int4(x2)
            elif name == "fp8" and x.device.type == "cuda":
                y = self._fp8_cuda(x2)
        if y is None:
            y, self.path = F.linear(x2, self.dequantize(x.dtype)), "dequantize"
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _int4(self, x2):
        key = (x2.device, x2.dtype)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = _prepare_int4(self, x2.device, x2.dtype)
        prepared = self._kernel_cache[key]
        if prepared is None:
            return None
        packed, scale_zeros = prepared
        g = self.scheme.group_size
        if x2.device.type == "cpu":
            self.path = "int4pack_cpu"
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, g, scale_zeros)
        self.path = "int4pack_tinygemm"
        return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, g, scale_zeros)

    def _w8a8(self, x2):
        key = ("fbgemm", x2.device)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = _prepack_fbgemm(self) if x2.device.type == "cpu" else None
        prepared = self._kernel_cache[key]
        if prepared is None:
            return self._w8a8_int_mm(x2)
        packed, reduce_range = prepared
        x = x2.float()
        if x.shape[0] == 1:  # one token: the op's per-call scale is already per token
            y = torch.ops.quantized.linear_dynamic(x.contiguous(), packed, reduce_range)
        else:  # rows scaled to amax 1 share one quantization range: per-token scales again
            amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)  # (M, 1)
            y = torch.ops.quantized.linear_dynamic((x / amax).contiguous(), packed, reduce_range) * amax
        self.path = "fbgemm_w8a8"
        return y.to(x2.dtype)

    def _w8a8_int_mm(self, x2):
        """Symmetric per-token activation scales, as compressed-tensors' dynamic `token` strategy takes
        them (amax / 127.5 (its (qmax - qmin) / 2), round half to even, clamp to [-128, 127])."""
        x_scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127.5  # (M, 1)
        xq = torch.round(x2.float() / x_scale).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight.t())  # (M, N) int32
        self.path = "int_mm_w8a8"
        return (acc.float() * x_scale * self.weight_scale.float().reshape(1, -1)).to(x2.dtype)

    def _fp8_cuda(self, x2):
        if torch.cuda.get_device_capability(x2.device) < (8, 9) or x2.dtype != torch.bfloat16:
            return None
        x_scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0  # (M, 1) per token
        xq = (x2.float() / x_scale).clamp(-448, 448).to(FP8)
        w = self.weight.view(FP8)  # (N, K)
        try:
            y = torch._scaled_mm(
                xq,
                w.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale.float().reshape(1, -1),
                out_dtype=x2.dtype,
            )
        except RuntimeError:  # shapes the kernel refuses (dims not multiples of 16)
            return None
        self.path = "scaled_mm_fp8"
        return y

    def extra_repr(self):
        g = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}{g}"


class QuantEmbedding(QuantLinear):
    """An nn.Embedding table (V, D) stored like a linear weight of V rows: a lookup dequantizes only the
    rows it gathers (each stored tensor with V rows is indexed; the scales are per row or per group)."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, scheme: Scheme) -> QuantEmbedding:
        w = emb.weight.detach()
        m = cls(emb.embedding_dim, emb.num_embeddings, False, scheme, w.dtype, "meta")
        for name, t in quantize_weight(scheme, w).items():
            setattr(m, name, (t.view(torch.uint8) if t.dtype == FP8 else t).to(w.device))
        m.set_dtype(w.dtype, w.device)
        return m

    def set_dtype(self, dtype, device=None):
        """The dtype lookups return: an empty buffer, so `model.to(dtype)` moves it with the model (the
        scales' own dtype is the file's choice: fp8 or e8m0 for the FP4 formats)."""
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {}
        for name, t in self.stored().items():
            if name == "weight_shape":
                t = torch.tensor([flat.numel(), self.in_features], dtype=t.dtype)
            elif t.dim() == 2 and t.shape[0] == self.out_features:
                t = t[flat]
            rows[name] = t
        self.path = "gather_dequantize"
        out = dequantize_weight(self.scheme, rows, self.dtype_probe.dtype)
        return out.reshape(*ids.shape, self.in_features)

    def extra_repr(self):
        return f"num_embeddings={self.out_features}, dim={self.in_features}, scheme={self.scheme.name}"


def _prepare_int4(m: QuantLinear, device, dtype):
    """The kernel's weight layout and (K/G, N, 2) scales-and-zeros; None where the kernel refuses the shape.
    tinygemm's zero point is in the float domain: w = (q - 8) * scale + zero, so zero = 0 here."""
    n, k = m.out_features, m.in_features
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=device)
    scale = m.weight_scale.to(device=device, dtype=dtype).t()  # (K/G, N)
    scale_zeros = torch.stack((scale, torch.zeros_like(scale)), -1).contiguous()

    def nibbles(rows: slice) -> torch.Tensor:
        """(rows, K) int32 in [0, 15]: the stored nibbles are already q + 8."""
        return ((m.weight_packed[rows].to(device)[..., None] >> shifts) & 0xF).reshape(-1, k)

    try:
        if device.type == "cpu":
            # The CPU layout keeps blocks of 64 rows apart, so it is built 256 (or 64) rows at a time: a
            # whole (N, K) int32 temporary per layer, freed into malloc's heap, would add hundreds of MB
            # to the process's resident set at the 155M shape.
            step = next((c for c in (256, 64) if n % c == 0), n)
            convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
            packed = torch.cat([convert(nibbles(slice(i, i + step)), 2) for i in range(0, n, step)])
        elif device.type == "cuda" and dtype == torch.bfloat16:
            q = nibbles(slice(None))
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8
            )
        else:
            return None
    except RuntimeError:
        return None
    return packed, scale_zeros


_QTENSOR_DEPRECATION = r"torch\.quantize_per_tensor, torch\.quantize_per_channel .* are deprecated"


def _prepack_fbgemm(m: QuantLinear):
    """(fbgemm's packed copy of the int8 weight (N, K) with its per-channel scales, reduce_range); None
    where fbgemm is not the quantized engine or the quantized-tensor API is gone."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return None
    try:
        return _fbgemm_pack(m.weight.detach(), m.weight_scale.detach().reshape(-1)), _reduce_range()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor):
    """weight (N, K) int8, scale (N,): bf16/fp32 scales are exact in the float64 the quantizer takes."""
    zeros = torch.zeros(scale.shape, dtype=torch.long)
    with warnings.catch_warnings():  # the deprecation of quantized tensors (see the module docstring)
        warnings.filterwarnings("ignore", message=_QTENSOR_DEPRECATION)
        qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


_REDUCE_RANGE: list[bool] = []


def _reduce_range() -> bool:
    """Whether fbgemm needs 7-bit activations on this CPU. Without AVX512-VNNI its kernel sums pairs of
    uint8 x int8 products in int16 (vpmaddubsw), which saturates at 255 * 127 * 2; a probe at that worst
    case, run once, tells whether the int32 sums are exact (8-bit activations) or not (7-bit, as
    PyTorch's own default qconfig for fbgemm takes them)."""
    if not _REDUCE_RANGE:
        packed = _fbgemm_pack(torch.full((16, 64), 127, dtype=torch.int8), torch.ones(16))
        y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)  # x -> uint8 255
        _REDUCE_RANGE.append(not torch.allclose(y, torch.full_like(y, 127 * 64), rtol=1e-3))
    return _REDUCE_RANGE[0]


def _fp8_views(module, state_dict, prefix, local_metadata):
    for name in module._fp8_names:
        state_dict[prefix + name] = state_dict[prefix + name].view(FP8)


def _from_file(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Check each stored tensor's dtype against the scheme (a wrong dtype is a broken file, not a cast)."""
    expected = stored_shapes(module.scheme, module.out_features, module.in_features, torch.float32)
    for name, (_, dtype) in expected.items():
        key = prefix + name
        if key not in state_dict:
            continue  # load_strict reports missing keys by name
        t = state_dict[key]
        if dtype == torch.float32:  # a scale: any float dtype the writer chose
            ok = t.is_floating_point() and t.dtype != FP8
        else:
            ok = t.dtype == dtype or (dtype == FP8 and t.dtype == torch.uint8)
        if not ok:
            raise CheckpointError(f"{key}: dtype {t.dtype}, expected {dtype} for {module.scheme.name}")
        if name in module._fp8_names:
            state_dict[key] = t.view(torch.uint8)


def quantizable(model: nn.Module, encoders: bool = False) -> list[str]:
    """Names of the nn.Linear modules the default swap quantizes: the decoder's (not the output head),
    plus the encoders' and projectors' when asked."""
    scope = DECODER_SCOPE + (ENCODER_SCOPE if encoders else ())
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and any(name.startswith(s) for s in scope)
    ]


HEAD = "language_model.lm_head"
EMBEDDINGS = "language_model.model.embed_tokens"
ACTIVATIONS = (None, "int8")


def quantize_model(
    model: nn.Module,
    scheme: str | Scheme = "int8",
    group_size: int | None = None,
    encoders: bool = False,
    modules: list[str] | None = None,
    head: bool = False,
    embeddings: bool = False,
    activations: str | None = None,
) -> list[str]:
    """Swap nn.Linear (and, with embeddings=True, the token nn.Embedding) for QuantLinear/QuantEmbedding
    in place; returns the swapped names. head/embeddings add the output head and the token embeddings to
    the default set (or to `modules`). activations="int8" quantizes each linear's input per token on the
    fly (int8 weights only). Every shape is checked before anything is swapped, so a refused model is
    left as it was."""
    scheme = scheme if isinstance(scheme, Scheme) else get_scheme(scheme, group_size)
    if activations not in ACTIVATIONS:
        raise ConfigError(f"quantize: activations {activations!r}: expected None or 'int8'")
    if activations and scheme.name != "int8":
        raise ConfigError(f"quantize: int8 activations need int8 weights, not {scheme.name}")
    modules = list(quantizable(model, encoders) if modules is None else modules)
    extra = [HEAD] * head + [EMBEDDINGS] * embeddings
    if extra and model.config.decoder.tie_embeddings:
        raise ConfigError(
            "quantize: the head and the embeddings share one tensor (tie_embeddings); quantizing either "
            "is not supported for a tied model"
        )
    modules += [n for n in extra if n not in modules]
    if not modules:
        raise ConfigError("quantize: the model has no nn.Linear layers to quantize")
    for name in modules:
        m = model.get_submodule(name)
        if type(m) is nn.Embedding:
            check_shape(scheme, name, m.num_embeddings, m.embedding_dim)
            continue
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"quantize: {name} is a {type(m).__name__}, not an nn.Linear")
        check_shape(scheme, name, m.out_features, m.in_features)
    for name in modules:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        if type(old) is nn.Embedding:
            setattr(parent, leaf, QuantEmbedding.from_embedding(old, scheme))
        else:
            q = QuantLinear.from_linear(old, scheme)
            q.activations = activations
            setattr(parent, leaf, q)
    return modules


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
