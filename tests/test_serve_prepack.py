"""The server's prepacked CPU linears: the same products as nn.Linear to float rounding, decoder only."""

import pytest
import torch
from torch import nn

import omnilm
from omnilm.config import get_preset
from omnilm.serve.prepack import PackedLinear, bucket, buckets, fuse_projections, prepack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_equals_linear(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).to(dtype)
    packed = PackedLinear(lin, batch_hint=16)
    # other batch sizes than the hint, 3-D input, and row counts past the hint (run padded to a bucket)
    for shape in [(1, 64), (16, 64), (3, 5, 64), (17, 64), (3, 45, 64), (1000, 64)]:
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
    # q/k/v and gate/up fused: qkv o gate_up down per layer, and the head
    assert n == len(linears) == 4 * model.config.decoder.num_layers + 1
    attn = model.language_model.model.layers[0].self_attn
    assert attn.q_proj is None and isinstance(attn.qkv_proj, PackedLinear)
    got = model(input_ids=ids).logits
    assert (got - ref_logits).abs().max() < 1e-4 * ref_logits.abs().max()
    assert torch.equal(model.generate(ids, max_new_tokens=8), ref_tokens)


def test_prepack_leaves_other_dtypes_alone():
    model = omnilm.build(get_preset("tiny"), seed=0).to(torch.float16)
    assert prepack_linears(model) == 0


def test_row_buckets_are_exact_to_the_hint_then_few_and_tight():
    assert [bucket(m, 16) for m in (1, 7, 16)] == [1, 7, 16]  # decode batches run as they are
    assert [bucket(m, 16) for m in (17, 32, 33, 129, 1025)] == [32, 32, 48, 144, 1152]
    for m in range(129, 5000):  # past 128 rows at most 1/8 more rows computed
        assert m <= bucket(m, 16) <= m * 9 / 8
    assert buckets(16) == list(range(1, 17)) + [32, 48, 64, 80, 96, 112, 128]  # what prepack builds


def test_warm_runs_every_bucket_once():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    packed = PackedLinear(lin, batch_hint=4)
    rows = []
    packed.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    packed.warm(up_to=40)
    assert rows == [1, 2, 3, 4, 16, 32, 48]  # the buckets of 1..40 rows
    x = torch.randn(5, 32)
    torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])  # Llama; Qwen2's biased q/k/v
def test_fused_projections_compute_what_the_separate_ones_do(qkv_bias):
    cfg = get_preset("tiny")
    cfg.decoder.qkv_bias = qkv_bias
    model = omnilm.build(cfg, seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, 2000, (2, 7), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_tokens = model(input_ids=ids).logits, model.generate(ids, max_new_tokens=6)
    layers = model.config.decoder.num_layers
    assert fuse_projections(model) == 2 * layers  # every attention and every SwiGLU of the decoder
    mlp = model.language_model.model.layers[0].mlp
    assert mlp.gate_proj is None and type(mlp.gate_up_proj) is nn.Linear
    torch.testing.assert_close(model(input_ids=ids).logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=6), ref_tokens)
