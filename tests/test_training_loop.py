import json
from pathlib import Path

import pytest
import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.errors import ConfigError, OmniLMError
from omnilm.training.checkpoint import _write_manifest, latest_checkpoint, list_checkpoints
from omnilm.training.config import TrainConfig, train_config_from_dict
from omnilm.training.loop import Trainer, train
from omnilm.training.optim import build_optimizer, freeze, lr_factor

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "tiny.jsonl"


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops: one thread avoids OpenMP spin-waits, which dominate on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def micro_model_dir(path, layers=1):
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048,
            hidden_size=32,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    omnilm.build(cfg, seed=0).save_pretrained(path)
    return path


def micro_config(model_dir, **overrides) -> TrainConfig:
    d = {
        "model": str(model_dir),
        "data": {"path": str(DATA), "seq_len": 32},
        "steps": 40,
        "batch_size": 4,
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "keep_last": 2,
    }
    d.update(overrides)
    return train_config_from_dict(d)


def test_resume_is_bit_identical_and_checkpoint_exports_to_transformers(tmp_path):
    model_dir = micro_model_dir(tmp_path / "m")
    cfg = micro_config(model_dir, save_every=10)
    full = train(cfg, tmp_path / "a", progress=False)
    assert len(full) == 40 and full[-1]["loss"] < full[0]["loss"] - 1.0

    first = train(cfg, tmp_path / "b", max_steps=20, progress=False)
    assert [c[0] for c in list_checkpoints(tmp_path / "b" / "checkpoints")] == [10, 20]  # keep_last 2
    second = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert [m["step"] for m in second] == list(range(21, 41))
    resumed = first + second
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]  # bit-identical
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in full]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 41)) and {
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
    } <= set(lines[0])

    # the newest checkpoint's weights are a Hugging Face Llama directory transformers loads
    from transformers import LlamaForCausalLM

    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.name == "step-00000040"
    ours = omnilm.load(ckpt / "model")
    theirs = LlamaForCausalLM.from_pretrained(ckpt / "model").eval()
    ids = torch.tensor([[1, 300, 301, 302, 700, 5]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    # and it is the trained model, not the initial one
    initial = omnilm.load(model_dir)
    assert not torch.allclose(initial(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    cfg = micro_config(micro_model_dir(tmp_path / "m"), steps=6, max_bad_steps=2)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    calls = {"n": 0, "poison": {3}}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] in calls["poison"] else output

    trainer.model.language_model.model.embed_tokens.register_forward_hook(poison)
    history = trainer.train()
    assert [m["skipped"] for m in history] == [False, False, True, False, False, False]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000006"

    trainer = Trainer(
        train_config_from_dict({**cfg.to_dict(), "steps": 12, "config_dir": ""}),
        tmp_path / "run",
        resume=True,
        progress=False,
    )
    trainer.model.language_model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: out * float("nan")
    )
    with pytest.raises(OmniLMError, match="2 non-finite steps in a row"):
        trainer.train()
    assert [c[0] for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        6
    ]  # nothing poisoned written


def test_freezing_module_lr_and_no_decay(tmp_path):
    model = omnilm.build(
        ModelConfig(
            decoder=DecoderConfig(
                vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
            )
        )
    )
    freeze(model, ["language_model.model.layers.0"])
    cfg = micro_config(tmp_path, optim={"lr": 1e-3, "module_lr": {"language_model.model.layers.1.mlp": 5e-4}})
    opt = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert not any(n.startswith("language_model.model.layers.0.") for n in seen)
    assert seen["language_model.model.layers.1.mlp.up_proj.weight"] == (5e-4, 0.1)
    assert seen["language_model.model.layers.1.self_attn.q_proj.weight"] == (1e-3, 0.1)
    assert seen["language_model.model.layers.1.input_layernorm.weight"] == (1e-3, 0.0)
    assert seen["language_model.model.embed_tokens.weight"] == (1e-3, 0.0)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    with pytest.raises(ConfigError, match="vision_tower"):
        freeze(model, ["vision_tower"])


def test_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_cli_train_with_max_steps(tmp_path, capsys):
    from omnilm.cli import main

    model_dir = micro_model_dir(tmp_path / "m")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ndata: {{path: {DATA}, seq_len: 32}}\nsteps: 50\nbatch_size: 2\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000003"
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text()
    )
    assert state["scheduler"]["last_epoch"] == 3 and state["config"]["steps"] == 50  # schedule unchanged
    cfg.write_text("model: tiny\nstepz: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "stepz" in capsys.readouterr().err


def test_alignment_stage_on_image_chat_data(tmp_path):
    """Vision tower frozen, projector trained at its own lr, on JSONL conversations with images."""
    from PIL import Image

    from omnilm.config import VisionConfig
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    vision = VisionConfig(
        kind="siglip",
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        feature_layer=None,
    )
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            rope_theta=10000.0,
        ),
        vision=vision,
        image_token_id=tok.image_token_id,
    )
    model = omnilm.build(cfg, seed=0)
    model.save_pretrained(tmp_path / "m")
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(4):
        pixels = (torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        lines.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"img{i}.png"},
                            {"type": "text", "text": "What?"},
                        ],
                    },
                    {"role": "assistant", "content": f"Picture number {i}."},
                ]
            }
        )
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tcfg = train_config_from_dict(
        {
            "model": str(tmp_path / "m"),
            "data": {"path": str(tmp_path / "d.jsonl"), "seq_len": 48},
            "steps": 2,
            "batch_size": 2,
            "freeze": ["vision_tower"],
            "activation_checkpointing": True,
            "optim": {"lr": 1e-2, "module_lr": {"multi_modal_projector": 5e-2}},
        }
    )
    trainer = Trainer(tcfg, tmp_path / "run", progress=False)
    assert trainer.loader.next_batch()[0]["pixel_values"].shape == (2, 3, 16, 16)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.train()
    assert len(history) == 2 and all(not m["skipped"] for m in history)
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("vision_tower.") for k in changed)
    assert any(k.startswith("multi_modal_projector.") for k in changed)
    assert any(k.startswith("language_model.") for k in changed)


def test_lora_training_saves_a_peft_adapter(tmp_path):
    model_dir = micro_model_dir(tmp_path / "m")
    cfg = micro_config(model_dir, steps=3, lora={"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    history = train(cfg, tmp_path / "run", progress=False)
    assert len(history) == 3
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    from omnilm.training.lora import load_adapter

    base = omnilm.load(ckpt / "model")
    initial = omnilm.load(model_dir)
    for (n, a), b in zip(base.state_dict().items(), initial.state_dict().values()):
        assert torch.equal(a, b), n  # only the adapter was trained
    assert len(load_adapter(base, ckpt / "adapter")) == 2  # q and v of the one layer
    ids = torch.tensor([[1, 300, 301, 302]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, initial(input_ids=ids).logits)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000010").mkdir(parents=True)
    (root / "step-00000010" / "trainer_state.json").write_text("{}")
    _write_manifest(root / "step-00000010")  # written last by a save: the mark of a complete one
    (root / ".tmp-step-00000030" / "dcp").mkdir(parents=True)  # a save killed before its rename
    (root / "step-00000020").mkdir()  # no trainer_state.json: not complete
    assert latest_checkpoint(root).name == "step-00000010"
    assert latest_checkpoint(tmp_path / "none") is None
