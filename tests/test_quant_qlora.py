"""QLoRA: LoRA adapters over a frozen 4-bit base (NF4 or int4). The adapter PEFT loads onto the
unquantized base gives the logits of our LoRA over that base; training lowers the loss like LoRA and
resumes bit-identically."""

import pytest
import torch
from test_lora import llama_dir, randomize_lora  # noqa: F401  (fixture)
from test_quant import sqnr
from test_training_loop import micro_config, micro_model_dir

import omnilm
from omnilm.errors import ConfigError
from omnilm.training.checkpoint import latest_checkpoint
from omnilm.training.config import train_config_from_dict
from omnilm.training.loop import train
from omnilm.training.lora import QLoRALinear, apply_lora, apply_qlora, load_adapter, save_adapter

IDS = torch.tensor([[3, 17, 42, 5, 88, 60, 1]])


@pytest.mark.parametrize("base", ["nf4", "int4"])
def test_peft_loads_the_qlora_adapter_onto_the_unquantized_base(llama_dir, tmp_path, base):  # noqa: F811
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = omnilm.load(llama_dir)
    assert len(apply_qlora(model, rank=4, alpha=8, quantize_base=base)) == 14
    mods = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(mods) == 14 and not any(hasattr(m, "weight") for m in mods)  # no dense copy kept
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    randomize_lora(model)
    with torch.no_grad():
        qlora = model(input_ids=IDS).logits
    save_adapter(model, tmp_path / "adapter")

    dense = omnilm.load(llama_dir)
    load_adapter(dense, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = dense(input_ids=IDS).logits, peft(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert sqnr(theirs, qlora) > 15  # the 4-bit base costs a little, not everything


def test_gradients_equal_lora_over_the_dequantized_base(llama_dir):  # noqa: F811
    q = omnilm.load(llama_dir)
    apply_qlora(q, rank=4, alpha=8, quantize_base="nf4")
    randomize_lora(q)
    ref = omnilm.load(llama_dir)
    apply_lora(ref, rank=4, alpha=8)
    with torch.no_grad():
        for n, a in q.named_modules():
            if isinstance(a, QLoRALinear):
                b = ref.get_submodule(n)
                b.weight.copy_(a.base_weight())
                b.lora_A.weight.copy_(a.lora_A.weight)
                b.lora_B.weight.copy_(a.lora_B.weight)
    for m in (q, ref):
        m(input_ids=IDS, labels=IDS).loss.backward()
    ref_params = dict(ref.named_parameters())
    trained = [(n, p) for n, p in q.named_parameters() if p.requires_grad]
    assert len(trained) == 28
    for n, p in trained:
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6)


def test_qlora_training_falls_like_lora_and_resumes_bit_identically(tmp_path):
    model_dir = micro_model_dir(tmp_path / "m")
    lora, optim = {"rank": 8, "alpha": 16}, {"lr": 3e-2, "warmup_steps": 3}
    plain = train(
        micro_config(model_dir, steps=16, optim=optim, lora=lora), tmp_path / "lora", progress=False
    )
    cfg = micro_config(model_dir, steps=16, save_every=8, optim=optim, lora={**lora, "quantize_base": "nf4"})
    full = train(cfg, tmp_path / "a", progress=False)
    assert full[-1]["loss"] < full[0]["loss"] - 0.1
    assert abs(full[-1]["loss"] - plain[-1]["loss"]) / plain[-1]["loss"] < 0.10
    first = train(cfg, tmp_path / "b", max_steps=8, progress=False)
    second = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert [m["loss"] for m in first + second] == [m["loss"] for m in full]
    # the checkpoint holds the (dequantized) base and a PEFT adapter
    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    omnilm.load(ckpt / "model")


def test_bad_quantize_base():
    with pytest.raises(ConfigError, match="lora.quantize_base must be 'nf4' or 'int4', got 'fp2'"):
        train_config_from_dict({"lora": {"quantize_base": "fp2"}})
