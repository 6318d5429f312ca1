"""The planner's per-scheme weight bytes are the bytes `omnilm quantize` writes; per-scheme GPU fit."""

import json

import pytest

import omnilm
from omnilm.cli import main
from omnilm.config import get_preset
from omnilm.errors import ConfigError
from omnilm.plan import parse_bytes, plan_preset, scheme_bytes
from omnilm.quant import SCHEMES
from omnilm.quant.io import tensor_bytes


def test_planned_bytes_equal_written_bytes(tmp_path, capsys):
    src = tmp_path / "tiny"
    omnilm.build("tiny", dtype="bfloat16").save_pretrained(src)
    planned = scheme_bytes(get_preset("tiny"), int4_group=32)
    for name in SCHEMES:
        out = tmp_path / name
        group = ["--group-size", "32"] if name == "int4" else []
        assert main(["quantize", "--model", str(src), "--scheme", name, *group, "--out", str(out)]) == 0
        # the tensors are exactly what was planned; the file adds its JSON header (1.5% on this toy)
        assert tensor_bytes(out / "model.safetensors") == planned[name], name
        assert f"{planned[name]:,} B of tensors" in capsys.readouterr().out


def test_design_88b_fit_on_one_141gb_gpu(capsys):
    p = plan_preset("design-88b", gpu_mem=parse_bytes("141GB"))
    fit = {k: v["fits"] for k, v in p["inference"]["schemes"].items()}
    assert fit == {"bf16": False, "int8": True, "int4": True, "fp8": True, "nvfp4": True, "mxfp4": True}
    assert main(["plan", "--preset", "design-88b", "--gpu-mem", "141GB", "--context", "32768", "--json"]) == 0
    inf = json.loads(capsys.readouterr().out)["inference"]
    assert inf["context"] == 32768 and inf["schemes"]["fp8"]["kv_bytes"] == 2 * 110 * 128 * 2 * 32768


def test_gpu_mem_sizes():
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1024") == 1024
    with pytest.raises(ConfigError, match="--gpu-mem 'lots'"):
        parse_bytes("lots")
