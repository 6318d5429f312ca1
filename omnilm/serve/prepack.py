"""The server's CPU linears with their weights prepacked once for oneDNN, as torch.compile's freezing does.

An eager nn.Linear on CPU calls a GEMM that re-packs the weight into its blocked layout on every call;
at decode batch sizes that repacking, from weights no longer in cache, is most of the product. oneDNN
takes the weight packed once (`mkldnn._reorder_linear_weight`) and multiplies from it. Measured on the
2-core VM, bench_serve's 4-layer Llama, 16 rows: a decode step 5.9-6.2 ms eager, 4.6-4.9 ms prepacked.

Applied from outside to a built model, for serving only (a module swap, like quantization): the packed
weight replaces the module's parameter, so the model cannot be trained or saved afterwards. Results
equal nn.Linear's to float rounding (a different summation order), not bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)
SCOPE = "language_model."  # the decoder runs every step; encoders once per request


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], ""
        )
        return y.view(*x.shape[:-1], self.out_features)


def available(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype in DTYPES and torch.backends.mkldnn.is_available()


def prepack_linears(model: nn.Module, batch_hint: int = 16) -> int:
    """Swap the decoder's plain nn.Linear modules (not quantized or LoRA ones) for PackedLinear;
    returns how many. A model on another device or dtype is left as it is (0)."""
    if not available(model):
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.startswith(SCOPE):
                setattr(module, child_name, PackedLinear(child, batch_hint))
                swapped += 1
    return swapped
