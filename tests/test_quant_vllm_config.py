"""The compressed-tensors keys vLLM reads to pick a kernel (its CompressedTensorsConfig), on the `omnilm quantize`
exports vLLM's CPU build serves in `make test-vllm` (int4 and W8A8 int8) and weight-only int8 (pack-quantized, as
compressed-tensors writes it; vLLM's CPU build has no 8-bit kernel for it, its CUDA kernel lists take uint8b128), asserted here so
`make test` catches a change without vLLM installed; and that each format is the one compressed-tensors
itself infers for the scheme (what llm-compressor writes)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quant import tiny_llama

import omnilm
from omnilm.errors import CheckpointError
from omnilm.quant import quantize_model
from omnilm.quant.formats import pack_int8, unpack_int8
from omnilm.quant.io import save_quantized

LINEAR = "model.layers.0.mlp.down_proj"  # (64, 128): out 64, in 128


def export(tmp_path, scheme, group_size=None, activations=None):
    model = tiny_llama()
    quantize_model(model, scheme, group_size, activations=activations)
    out = tmp_path / f"{scheme}-{activations}"
    save_quantized(model, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    return qc, load_file(out / "model.safetensors")


def test_int4_is_vllms_wna16_pack_quantized(tmp_path):
    qc, state = export(tmp_path, "int4", 32)
    (group,) = qc["config_groups"].values()
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == group["format"] == "pack-quantized"
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert group["input_activations"] is None  # weight-only: vLLM's CompressedTensorsWNA16
    w = group["weights"]
    assert (w["type"], w["num_bits"], w["strategy"], w["group_size"]) == ("int", 4, "group", 32)
    assert w["symmetric"] is True and w["dynamic"] is False  # symmetric: no weight_zero_point tensor
    assert state[f"{LINEAR}.weight_packed"].dtype == torch.int32
    assert state[f"{LINEAR}.weight_packed"].shape == (64, 128 // 8)
    assert state[f"{LINEAR}.weight_scale"].shape == (64, 128 // 32)
    assert state[f"{LINEAR}.weight_shape"].tolist() == [64, 128]
    assert not any(k.endswith("weight_zero_point") for k in state)


def test_w8a8_int8_is_vllms_int_quantized(tmp_path):
    qc, state = export(tmp_path, "int8", activations="int8")
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == "int-quantized"  # vLLM: an activation-quantization format
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["strategy"], w["symmetric"]) == ("int", 8, "channel", True)
    # vLLM's CompressedTensorsW8A8Int8 with dynamic per-token activation scales
    assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"], a["symmetric"]) == (
        "int",
        8,
        "token",
        True,
        True,
    )
    assert state[f"{LINEAR}.weight"].dtype == torch.int8 and state[f"{LINEAR}.weight"].shape == (64, 128)
    assert state[f"{LINEAR}.weight_scale"].shape == (64, 1)


def test_weight_only_int8_is_pack_quantized_and_loads_back(tmp_path):
    qc, state = export(tmp_path, "int8")
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == "pack-quantized" and group["input_activations"] is None
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
    assert state[f"{LINEAR}.weight_packed"].dtype == torch.int32
    assert state[f"{LINEAR}.weight_packed"].shape == (64, 128 // 4)
    assert state[f"{LINEAR}.weight_shape"].tolist() == [64, 128] and f"{LINEAR}.weight" not in state
    model = tiny_llama()
    quantize_model(model, "int8")
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():  # the unpacked int8 weight is the one quantized in memory
        assert torch.equal(
            model(input_ids=ids).logits, omnilm.load(tmp_path / "int8-None")(input_ids=ids).logits
        )


def test_earlier_format_names_still_load(tmp_path):
    """Files written before the formats above (fp8 float-quantized, weight-only int8 int-quantized)."""
    for scheme, old in (("fp8", "float-quantized"), ("int8", "int-quantized")):
        model = tiny_llama()
        quantize_model(model, scheme)
        out = tmp_path / scheme
        save_quantized(model, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"]["format"] = cfg["quantization_config"]["config_groups"]["group_0"][
            "format"
        ] = old
        (out / "config.json").write_text(json.dumps(cfg))
        if scheme == "int8":  # the unpacked int8 `weight` of those files
            state = load_file(out / "model.safetensors")
            for key in [k for k in state if k.endswith(".weight_packed")]:
                base = key.removesuffix("_packed")
                state[base] = unpack_int8(state.pop(key), int(state.pop(f"{base}_shape")[1]))
            save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        ids = torch.tensor([[5, 17, 99, 3, 250]])
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, omnilm.load(out)(input_ids=ids).logits), scheme


def test_broken_packed_int8_is_refused_by_name(tmp_path):
    export(tmp_path, "int8")
    out, key = tmp_path / "int8-None", f"{LINEAR}.weight_shape"
    state = load_file(out / "model.safetensors")
    for bad in (torch.tensor([64, 1 << 40]), torch.tensor([64.0, 128.0]), torch.tensor([64])):
        save_file({**state, key: bad}, out / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=f"{key} .* does not match {LINEAR}.weight_packed"):
            omnilm.load(out)


@pytest.mark.parametrize("k", [128, 130])
def test_pack_int8_is_compressed_tensors_pack_to_int32(k):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-128, 128, (6, k), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    assert torch.equal(pack_int8(q), ct.pack_to_int32(q, 8))
    assert torch.equal(unpack_int8(pack_int8(q), k), q)


def _inferred_format(qc):
    """The format compressed-tensors itself (llm-compressor's writer) picks for the group's scheme."""
    fmt = pytest.importorskip("compressed_tensors.compressors.format")
    qz = pytest.importorskip("compressed_tensors.quantization")
    (group,) = qc["config_groups"].values()
    scheme = qz.QuantizationScheme(
        targets=group["targets"], weights=group["weights"], input_activations=group["input_activations"]
    )
    return fmt.infer_module_format(torch.nn.Linear, scheme).value


@pytest.mark.parametrize(
    "scheme,group_size,activations",
    [
        ("int4", 32, None),
        ("int8", None, "int8"),
        ("int8", None, None),
        ("fp8", None, None),
    ],
)
def test_format_is_the_one_compressed_tensors_infers(tmp_path, scheme, group_size, activations):
    qc, _ = export(tmp_path, scheme, group_size, activations)
    assert qc["format"] == _inferred_format(qc)
