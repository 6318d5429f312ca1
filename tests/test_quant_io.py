"""compressed-tensors directories: quantize -> save -> load gives the in-memory quantized model's logits,
transformers (with the compressed-tensors package) reads our files, and broken files are refused by name."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quant import GROUP, sqnr, tiny_llama

import omnilm
from omnilm.errors import CheckpointError
from omnilm.quant import SCHEMES, quantize_model
from omnilm.quant.io import save_quantized

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 120, 64]])


def quantized_dir(tmp_path, name, model=None):
    model = model or tiny_llama()
    quantize_model(model, name, GROUP.get(name))
    out = tmp_path / name
    save_quantized(model, out)
    return model, out


@pytest.mark.parametrize("name", SCHEMES)
def test_round_trip_gives_identical_logits(tmp_path, name):
    model, out = quantized_dir(tmp_path, name)
    loaded = omnilm.load(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    keys = load_file(out / "model.safetensors")
    if name == "int4":
        assert {
            "model.layers.0.mlp.down_proj.weight_packed",
            "model.layers.0.mlp.down_proj.weight_shape",
        } <= set(keys)


def test_compressed_tensors_accepts_our_config(tmp_path):
    qz = pytest.importorskip("compressed_tensors.quantization")
    for name in SCHEMES:
        _, out = quantized_dir(tmp_path, name)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qz.QuantizationConfig.model_validate(qc).format == qc["format"]


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_transformers_loads_our_directories(tmp_path, name):
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model, out = quantized_dir(tmp_path, name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=IDS).logits, hf(input_ids=IDS).logits
    assert sqnr(ours, theirs) >= 35


def test_load_quantize_on_the_fly(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp32")
    q = omnilm.load(tmp_path / "fp32", quantize="int8")
    quantize_model(model, "int8")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, q(input_ids=IDS).logits)


def _rewrite(out, fn):
    state = load_file(out / "model.safetensors")
    fn(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def test_broken_directories_are_refused_by_name(tmp_path):
    _, out = quantized_dir(tmp_path, "int4")
    key = "model.layers.1.self_attn.q_proj.weight_scale"
    _rewrite(out, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=f"missing keys {key}"):
        omnilm.load(out)
    _, out = quantized_dir(tmp_path, "int4")
    _rewrite(out, lambda s: s.__setitem__(key, s[key][:, :1].contiguous()))
    with pytest.raises(CheckpointError, match=f"shape mismatch for {key}"):
        omnilm.load(out)
    _, out = quantized_dir(tmp_path, "int8")
    w = "model.layers.0.mlp.up_proj.weight_packed"  # weight-only int8: pack-quantized in the file
    _rewrite(out, lambda s: s.__setitem__(w, s[w].float()))
    with pytest.raises(CheckpointError, match=f"{w}: dtype torch.float32, expected torch.int32"):
        omnilm.load(out)
    _, out = quantized_dir(tmp_path, "fp8")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config_groups.group_0.weights: type/num_bits/strategy"):
        omnilm.load(out)
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    cfg["quantization_config"]["ignore"] = []
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing keys lm_head.weight_scale"):
        omnilm.load(out)
    cfg["quantization_config"]["quant_method"] = "gptq"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported"):
        omnilm.load(out)


def test_failed_write_leaves_no_directory(tmp_path, monkeypatch):
    import omnilm.quant.io as qio

    model = tiny_llama()
    quantize_model(model, "int8")

    def boom(model, path):
        (path / "model.safetensors").parent.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(qio, "save_llama", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "omnilm", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_quantize_demo_copies_the_processor_and_loads(tmp_path):
    out = tmp_path / "demo-int4"
    r = _cli("quantize", "--model", "demo", "--scheme", "int4", "--group-size", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "preprocessor_config.json", "image_tokenizer", "omnilm_config.json"} <= names
    ref = omnilm.load("demo")
    quantize_model(ref, "int4", 32)
    loaded = omnilm.load(out)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, loaded(input_ids=ids).logits)
    omnilm.load_processor(out)  # the copied tokenizer and processor files read


def test_cli_quantize_errors_are_one_line(tmp_path, capsys):
    from omnilm.cli import main

    for args, msg in (
        (("--scheme", "int3"), "error: unknown quantization scheme 'int3'"),
        (("--scheme", "int4", "--group-size", "64"), "is not divisible by the int4 group size 64"),
    ):
        assert main(["quantize", "--model", "demo", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "x").exists()


def test_demo_with_encoders_round_trips(tmp_path):
    model = omnilm.load("demo")
    names = quantize_model(model, "int8", encoders=True)
    assert any(n.startswith("vision_tower.") for n in names) and any(
        n.startswith("audio_tower.") for n in names
    )
    save_quantized(model, tmp_path / "q", source=omnilm.BUNDLED_MODELS["demo"])
    loaded = omnilm.load(tmp_path / "q")
    processor = omnilm.load_processor(tmp_path / "q")
    from PIL import Image

    batch = processor(text="which digit is this?", images=[Image.new("RGB", (16, 16), "white")])
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        b = loaded(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert torch.equal(a, b)
