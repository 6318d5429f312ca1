"""The server's CPU linears with their weights prepacked once for oneDNN, as torch.compile's freezing does.

An eager nn.Linear on CPU calls a GEMM that re-packs the weight into its blocked layout on every call;
at decode batch sizes that repacking, from weights no longer in cache, is most of the product. oneDNN
takes the weight packed once (`mkldnn._reorder_linear_weight`) and multiplies from it. Measured on the
2-core VM, bench_serve's 4-layer Llama, 16 rows: a decode step 5.9-6.2 ms eager, 4.6-4.9 ms prepacked.

oneDNN builds (JIT-compiles) a kernel for each row count it meets, ~0.5-1 ms per weight shape the first
time: a prefill of a new size (requests x prompt tokens arriving together) paid that for every layer,
and a wave of 16 requests met a 120 ms step. So row counts are bucketed (exact up to the batch hint,
the decode sizes; past it rounded up, the extra rows zeros and the result cut back) and the buckets up
to MAX_WARM rows are built at prepack for the layers' weight shapes, so serving meets no kernel built on
the way (the heads, which see one row per request, build theirs as they come).

The decoder's q/k/v projections become one product, as do the SwiGLU's gate/up (the model's
qkv_proj / gate_up_proj): three and two GEMMs become one each, which at decode sizes saves the fixed
cost of a call (54 us a layer at 16 rows on the 4-layer bench model, ~5% of a decode step).

Applied from outside to a built model, for serving only (a module swap, like quantization): the packed
weight replaces the module's parameter, so the model cannot be trained or saved afterwards. Results
equal nn.Linear's to float rounding (a different summation order), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)
SCOPE = "language_model."  # the decoder runs every step; encoders once per request
MAX_WARM = 128  # buckets up to this many rows are built at prepack (a few ms per weight shape)


def bucket(rows: int, exact: int) -> int:
    """The row count a product of `rows` rows runs at: exact up to `exact`, then rounded up to a
    multiple of 16, or of 1/8 of the power of two below it when that is more: at most 1/8 extra rows
    past 128, and eight buckets per doubling."""
    if rows <= exact:
        return rows
    step = max(16, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // step) * step


def buckets(exact: int, up_to: int = MAX_WARM) -> list[int]:
    """Every row count bucket() gives for 1..up_to rows."""
    return sorted({bucket(m, exact) for m in range(1, up_to + 1)})


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        padded = bucket(rows, self.batch_hint)
        if padded != rows:
            x2 = F.pad(x2, (0, 0, 0, padded - rows))
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], self.out_features)

    @torch.inference_mode()
    def warm(self, up_to: int = MAX_WARM):
        """Build oneDNN's kernels for every bucket up to `up_to` rows."""
        x = torch.zeros(1, self.in_features, dtype=self.packed.dtype, device=self.packed.device)
        for rows in buckets(self.batch_hint, up_to):
            self(x.expand(rows, -1))


def available(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype in DTYPES and torch.backends.mkldnn.is_available()


def fuse_projections(model: nn.Module) -> int:
    """Give each decoder attention whose q/k/v are plain nn.Linear one qkv_proj (their weights
    stacked), and each such SwiGLU one gate_up_proj; the separate projections are dropped. Returns how
    many modules were fused. The products are the same rows of the same weights."""
    from ..models.common.attention import SelfAttention
    from ..models.common.mlp import SwiGLU

    fused = 0
    for name, module in list(model.named_modules()):
        if not name.startswith(SCOPE):
            continue
        if isinstance(module, SelfAttention) and _plain(module.q_proj, module.k_proj, module.v_proj):
            module.qkv_proj = _stacked(module.q_proj, module.k_proj, module.v_proj)
            module.q_proj = module.k_proj = module.v_proj = None
            fused += 1
        elif isinstance(module, SwiGLU) and _plain(module.gate_proj, module.up_proj):
            module.gate_up_proj = _stacked(module.gate_proj, module.up_proj)
            module.gate_proj = module.up_proj = None
            fused += 1
    return fused


def _plain(*linears) -> bool:
    return all(type(m) is nn.Linear for m in linears) and len({m.bias is None for m in linears}) == 1


def _stacked(*linears: nn.Linear) -> nn.Linear:
    first = linears[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None)
    out = out.to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out


def prepack_linears(model: nn.Module, batch_hint: int = 16, warm: bool = True) -> int:
    """Fuse the decoder's projections (fuse_projections), then swap its plain nn.Linear modules (not
    quantized or LoRA ones) for PackedLinear; returns how many. A model on another device or dtype is
    left as it is (0). warm: build the kernels of every bucket up to MAX_WARM rows now, once per
    weight shape of the layers (oneDNN caches them; measured for a 2048-wide layer: ~1 s)."""
    if not available(model):
        return 0
    fuse_projections(model)
    swapped, shapes = 0, set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.startswith(SCOPE):
                packed = PackedLinear(child, batch_hint)
                setattr(module, child_name, packed)
                swapped += 1
                shape = (
                    packed.in_features,
                    packed.out_features,
                    packed.bias is not None,
                    packed.packed.dtype,
                )
                # the layers' products see prefill row counts; a head sees one row per request (at
                # most batch_hint counts, built as they come: warming a 128k-vocabulary head to 128
                # rows would take 4 s of start-up on one core)
                if warm and ".layers." in full and shape not in shapes:
                    shapes.add(shape)
                    packed.warm()
    return swapped
