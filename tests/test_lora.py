import json

import pytest
import torch

import omnilm
from omnilm.errors import CheckpointError
from omnilm.training.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    unmerge_lora,
)


@pytest.fixture
def llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_peft_loads_our_adapter_with_the_same_logits(llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = omnilm.load(llama_dir)
    ids = torch.tensor([[3, 17, 42, 5, 88, 60, 1]])
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 2 * 7  # q/k/v/o + gate/up/down in each of 2 layers
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)  # B = 0 at init
    randomize_lora(model)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert not torch.allclose(ours, base_logits, atol=1e-3)

    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28

    hf = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # merge folds the update into the weights (same function), unmerge restores the base
    q = model.language_model.model.layers[0].self_attn.q_proj
    w0 = q.weight.detach().clone()
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(q.weight, w0)
    unmerge_lora(model)
    torch.testing.assert_close(q.weight, w0, rtol=0, atol=1e-6)

    # loading the adapter onto a fresh OmniLM model gives the same logits again
    fresh = omnilm.load(llama_dir)
    assert len(load_adapter(fresh, tmp_path / "adapter")) == 14
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_lora_targets_dropout_and_errors(llama_dir, tmp_path):
    model = omnilm.load(llama_dir)
    apply_lora(model, rank=2, alpha=2, dropout=0.5, targets=("q_proj", "v_proj"))
    mods = lora_modules(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in mods}) == ["q_proj", "v_proj"]
    layer = next(iter(mods.values()))
    assert isinstance(layer, LoRALinear) and layer.scaling == 1.0
    # state-dict names of the base weights are unchanged (checkpoints and conversion still match)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(omnilm.load(llama_dir), tmp_path / "empty")
