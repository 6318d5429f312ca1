"""FSDP2 across 2 CPU processes (gloo), launched the way users launch it: torchrun -m omnilm train."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.training.checkpoint import latest_checkpoint
from omnilm.training.config import train_config_from_dict
from omnilm.training.loop import train

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "tiny.jsonl"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fsdp_two_processes_match_one_and_resume_in_one(tmp_path):
    cfg_model = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    omnilm.build(cfg_model, seed=0).save_pretrained(tmp_path / "m")
    settings = {
        "model": str(tmp_path / "m"),
        "data": {"path": str(DATA), "seq_len": 32},
        "steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "optim": {"lr": 1e-2, "warmup_steps": 2},
    }
    (tmp_path / "c.yaml").write_text(json.dumps(settings))  # JSON is YAML

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "omnilm",
        "train",
        "--config",
        str(tmp_path / "c.yaml"),
        "--out",
        str(tmp_path / "fsdp"),
        "--max-steps",
        "3",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = latest_checkpoint(tmp_path / "fsdp" / "checkpoints")
    assert ckpt.name == "step-00000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    two = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]

    cfg = train_config_from_dict(settings)
    one = train(cfg, tmp_path / "single", progress=False)
    resumed = train(
        cfg, tmp_path / "fsdp", resume=True, progress=False
    )  # the 2-process checkpoint, 1 process

    assert [m["step"] for m in two] == [1, 2, 3] and [m["step"] for m in resumed] == [4, 5, 6]
    for got, ref in zip(two + resumed, one):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (got, ref)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (got, ref)
    assert one[-1]["loss"] < one[0]["loss"]
