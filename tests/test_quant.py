"""Low-bit schemes: numerics per scheme (SQNR against fp32), the CPU kernels against the dequantized
reference, the bit layouts against compressed-tensors' own packers, and refusals."""

import copy

import pytest
import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.errors import ConfigError
from omnilm.quant import SCHEMES, QuantLinear, get_scheme, quant_modules, quantize_model
from omnilm.quant.formats import (
    dequantize_weight,
    fp4_decode,
    pack_int4,
    pack_nibbles,
    quantize_weight,
    unpack_int4,
)

GROUP = {"int4": 32}  # the tiny widths (64, 128) take int4 groups of 32


def tiny_llama(seed=0, hidden=64, ffn=128, vocab=256):
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=ffn,
            max_seq_len=128,
            tie_embeddings=False,
        )
    )
    model = omnilm.build(cfg, seed=seed)
    with torch.no_grad():  # away from init: norms not 1, weights not all N(0, 0.02)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.02))
    return model


def sqnr(ref, x):
    return float(10 * torch.log10(ref.float().pow(2).sum() / (ref.float() - x.float()).pow(2).sum()))


# measured on N(0, 1) weights (64 x 256): int8 43, fp8 31.7, int4/32 20.5, nvfp4 20.4, mxfp4 18.8 dB
WEIGHT_SQNR = {"int8": 38, "fp8": 28, "int4": 17, "nvfp4": 17, "mxfp4": 14}


@pytest.mark.parametrize("name", SCHEMES)
def test_weight_round_trip_sqnr(name):
    w = torch.randn(64, 256)
    scheme = get_scheme(name, GROUP.get(name))
    w_hat = dequantize_weight(scheme, quantize_weight(scheme, w))
    assert sqnr(w, w_hat) > WEIGHT_SQNR[name]
    w[3] = 0  # an all-zero row or group quantizes to zeros (scale 1, no division by zero)
    assert torch.equal(dequantize_weight(scheme, quantize_weight(scheme, w))[3], torch.zeros(256))


@pytest.mark.parametrize("name", SCHEMES)
def test_model_logits_sqnr_vs_fp32(name):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        q = copy.deepcopy(model)
        names = quantize_model(q, name, GROUP.get(name))
        out = q(input_ids=ids).logits
    assert len(names) == 2 * 7 and "language_model.lm_head" not in names  # head stays 16-bit
    assert sqnr(ref, out) > WEIGHT_SQNR[name] - 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("out_features", [96, 320])  # 320: the int4 layout is built 64 rows at a time
def test_cpu_kernels_match_the_dequantized_matmul(name, dtype, out_features):
    lin = torch.nn.Linear(128, out_features, bias=True)
    q = QuantLinear.from_linear(lin, get_scheme(name, GROUP.get(name))).to(dtype)
    x = torch.randn(3, 5, 128, dtype=dtype)
    y = q(x)
    assert q.path in ("int8pack", "int4pack_cpu")
    ref = torch.nn.functional.linear(x.float(), q.dequantize(torch.float32), q.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max())


def test_layouts_match_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors")
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert torch.equal(pack_int4(q), ct.pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(ct.pack_to_int32(q, 4)), q)
    codes = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    theirs = ct.unpack_fp4_from_uint8(pack_nibbles(codes), 16, 64, dtype=torch.float32)
    assert torch.equal(theirs, fp4_decode(codes))


def test_to_bfloat16_moves_fp8_codes_without_re_encoding():
    model = tiny_llama()
    quantize_model(model, "fp8")
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.float8_e4m3fn}
    model.to(torch.bfloat16)
    after = model.state_dict()
    assert before and all(
        torch.equal(v.view(torch.uint8), after[k].view(torch.uint8)) for k, v in before.items()
    )
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[3, 4, 5]])).logits.dtype == torch.bfloat16


def test_refusals_leave_the_model_untouched():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ConfigError, match="int4 group size 48"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(ConfigError, match="input width 64 is not divisible by the int4 group size 128"):
        quantize_model(model, "int4", group_size=128)
    with pytest.raises(ConfigError, match="nvfp4 has groups of 16"):
        quantize_model(model, "nvfp4", group_size=32)
    assert not quant_modules(model)
