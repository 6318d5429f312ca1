"""Quantizing the output head and the token embeddings when asked, int8 dynamic activations (W8A8), and
what transformers + compressed-tensors do with our FP4 directories in fp32 (a documented limitation)."""

import json
import warnings

import pytest
import torch
from test_quant import GROUP, sqnr, tiny_llama
from test_quant_io import IDS

import omnilm
from omnilm.errors import ConfigError
from omnilm.quant import SCHEMES, QuantEmbedding, QuantLinear, get_scheme, quant_modules, quantize_model
from omnilm.quant.io import save_quantized

HEAD_AND_EMB = dict(head=True, embeddings=True)
# fbgemm serves W8A8 where it is PyTorch's quantized engine (x86 builds); elsewhere torch._int_mm
FBGEMM = torch.backends.quantized.engine in ("x86", "fbgemm")
W8A8_PATH = "fbgemm_w8a8" if FBGEMM else "int_mm_w8a8"


def _saved(tmp_path, name, **kw):
    model = tiny_llama()
    quantize_model(model, name, GROUP.get(name), **kw)
    out = tmp_path / name
    save_quantized(model, out)
    return model, out


@pytest.mark.parametrize("name", SCHEMES)
def test_head_and_embeddings_round_trip(tmp_path, name):
    model, out = _saved(tmp_path, name, **HEAD_AND_EMB)
    lm = model.language_model
    assert isinstance(lm.lm_head, QuantLinear) and isinstance(lm.model.embed_tokens, QuantEmbedding)
    loaded = omnilm.load(out)
    assert isinstance(loaded.language_model.model.embed_tokens, QuantEmbedding)
    assert loaded.dtype == torch.float32  # read off the final norm, not the int head
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    group = json.loads((out / "config.json").read_text())["quantization_config"]
    assert group["ignore"] == [] and group["config_groups"]["group_0"]["targets"] == ["Linear", "Embedding"]
    # the embedding lookup dequantizes the rows it gathers: the same rows as dequantizing the whole table
    emb = loaded.language_model.model.embed_tokens
    assert torch.equal(emb(IDS)[0], emb.dequantize()[IDS[0]])


def test_head_only_and_generation(tmp_path):
    model, out = _saved(tmp_path, "int4", head=True)
    loaded = omnilm.load(out, dtype="bfloat16")
    assert not isinstance(loaded.language_model.model.embed_tokens, QuantEmbedding)
    ids = loaded.generate(IDS, max_new_tokens=4)
    assert ids.shape[-1] >= IDS.shape[-1] + 1


@pytest.mark.parametrize(
    "name, kw", [("int8", HEAD_AND_EMB), ("fp8", HEAD_AND_EMB), ("int4", dict(head=True))]
)
def test_transformers_loads_quantized_head_and_embeddings(tmp_path, name, kw):
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model, out = _saved(tmp_path, name, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert sqnr(model(input_ids=IDS).logits, hf(input_ids=IDS).logits) >= 35


def test_transformers_cannot_load_packed_embeddings(tmp_path):
    """A pack-quantized (int4) nn.Embedding holds weight_packed, not weight (compressed-tensors' own
    layout, the one vLLM reads); transformers 5.24's PreTrainedModel._init_weights calls
    init.normal_(module.weight) on every nn.Embedding without the getattr guard it has for nn.Linear, so
    the load fails before any weight is read. int8/fp8 embeddings (which keep a `weight`) load."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    _, out = _saved(tmp_path, "int4", embeddings=True)
    assert omnilm.load(out) is not None
    with pytest.raises(AttributeError, match="'Embedding' object has no attribute 'weight'"):
        transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_int8_dynamic_activations(tmp_path):
    ref = tiny_llama()
    model, out = _saved(tmp_path, "int8", activations="int8")
    assert {m.path for m in quant_modules(model).values()} == {None}
    loaded = omnilm.load(out)
    with torch.no_grad():
        a, b, r = model(input_ids=IDS).logits, loaded(input_ids=IDS).logits, ref(input_ids=IDS).logits
    assert torch.equal(a, b) and {m.path for m in quant_modules(loaded).values()} == {W8A8_PATH}
    assert sqnr(r, a) >= 25
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers fake-quantizes the activations the same way
        assert sqnr(a, hf(input_ids=IDS).logits) >= 35


@pytest.mark.skipif(not FBGEMM, reason="fbgemm is not the quantized engine of this build")
def test_fbgemm_w8a8_matches_int_mm_per_token():
    """fbgemm quantizes its input with one affine scale per call; rows are rescaled to amax 1 first, so a
    token 50x louder than the others costs them nothing: every row agrees with the symmetric per-token
    torch._int_mm path and with fp32 as closely as that path does. Batch-1 decode (one row) too, in bf16."""
    lin = torch.nn.Linear(256, 384, bias=True)
    with torch.no_grad():
        lin.bias.normal_()
    q = QuantLinear.from_linear(lin, get_scheme("int8"))
    q.activations = "int8"
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1))
    x[0] *= 50
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the quantized-tensor deprecation warning is silenced at prepack
        ref, fb = lin(x), q(x)
        assert q.path == "fbgemm_w8a8"
        fb1 = q.to(torch.bfloat16)(x[3:4].bfloat16())
        assert q.path == "fbgemm_w8a8" and fb1.dtype == torch.bfloat16
        q.float()._kernel_cache[("fbgemm", x.device)] = None  # as where the prepack fails
        im = q(x)
        assert q.path == "int_mm_w8a8"
    for i in range(6):
        assert sqnr(ref[i], fb[i]) >= 38 and abs(sqnr(ref[i], fb[i]) - sqnr(ref[i], im[i])) < 1.5
    assert sqnr(ref[3:4], fb1) >= 35


def test_refusals():
    with pytest.raises(ConfigError, match="int8 activations need int8 weights, not int4"):
        quantize_model(tiny_llama(), "int4", 32, activations="int8")
    tied = tiny_llama()
    tied.config.decoder.tie_embeddings = True
    with pytest.raises(ConfigError, match="tie_embeddings"):
        quantize_model(tied, "int8", head=True)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_transformers_fp4_needs_a_16bit_dtype(tmp_path, name):
    """compressed-tensors (0.20.1) decompresses nvfp4/mxfp4 weights with unpack_fp4_from_uint8's default
    dtype=torch.bfloat16 and dequantizes in that dtype, whatever dtype the model was loaded in; the file
    holds only uint8 codes and fp8/e8m0 scales, so no layout choice of ours changes it. Loaded in bf16 it
    agrees with ours; loaded in fp32 the decompressed weights stay bf16 and the first matmul fails."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model, out = _saved(tmp_path, name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert sqnr(model(input_ids=IDS).logits, hf(input_ids=IDS).logits.float()) >= 35
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="same dtype"):
        hf(input_ids=IDS)


def test_cli_include_head_and_embeddings(tmp_path, capsys):
    from omnilm.cli import main

    tiny_llama().save_pretrained(tmp_path / "src")
    out = tmp_path / "q"
    args = ["quantize", "--model", str(tmp_path / "src"), "--scheme", "int8", "--out", str(out)]
    assert main([*args, "--include-head", "--include-embeddings", "--activations", "int8"]) == 0
    loaded = omnilm.load(out)
    lm = loaded.language_model
    assert isinstance(lm.model.embed_tokens, QuantEmbedding) and lm.lm_head.activations == "int8"
    assert "int8, 16 layers" in capsys.readouterr().out  # 14 decoder linears, the head, the embeddings
    assert main([*args, "--scheme", "int4", "--group-size", "32", "--activations", "int8"]) == 2
    assert "error: quantize: int8 activations need int8 weights" in capsys.readouterr().err


def test_tied_file_with_quantized_embeddings_is_refused(tmp_path):
    from omnilm.errors import CheckpointError

    _, out = _saved(tmp_path, "int8", embeddings=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantized embeddings in a model with tied embeddings"):
        omnilm.load(out)
