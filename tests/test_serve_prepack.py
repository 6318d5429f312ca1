"""The server's prepacked CPU linears: the same products as nn.Linear to float rounding, decoder only."""

import pytest
import torch
from torch import nn

import omnilm
from omnilm.config import get_preset
from omnilm.serve.prepack import PackedLinear, prepack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_equals_linear(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).to(dtype)
    packed = PackedLinear(lin, batch_hint=16)
    for shape in [(1, 64), (16, 64), (3, 5, 64)]:  # other batch sizes than the hint, and 3-D input
        x = torch.randn(shape, dtype=dtype)
        ref = lin(x)
        got = packed(x)
        assert got.shape == ref.shape and got.dtype == dtype
        assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_prepack_swaps_the_decoder_and_keeps_its_answers():
    model = omnilm.build(get_preset("tiny"), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from init, so greedy decoding is not one repeated token
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, 2000, (2, 9), generator=torch.Generator().manual_seed(1))
    ref_logits = model(input_ids=ids).logits
    ref_tokens = model.generate(ids, max_new_tokens=8)
    n = prepack_linears(model)
    linears = [m for name, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert n == len(linears) == 7 * model.config.decoder.num_layers + 1  # q k v o gate up down, the head
    got = model(input_ids=ids).logits
    assert (got - ref_logits).abs().max() < 1e-4 * ref_logits.abs().max()
    assert torch.equal(model.generate(ids, max_new_tokens=8), ref_tokens)


def test_prepack_leaves_other_dtypes_alone():
    model = omnilm.build(get_preset("tiny"), seed=0).to(torch.float16)
    assert prepack_linears(model) == 0
