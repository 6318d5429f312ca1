"""Training Mllama-style models: the alignment stage trains only the cross-attention layers and the
projector (and moves the gates and the answers); LoRA on the cross-attention projections saves in
PEFT's layout and loads into transformers + peft with the same logits."""

import json

import pytest
import torch
import transformers
from test_mllama import hf_config, inputs, perturb
from test_mllama_cli import tiny_config

import omnilm
from omnilm.models.mllama import alignment_parameters, cross_attention_linears
from omnilm.processing.mllama import cross_attention_mask
from omnilm.training.lora import apply_lora, save_adapter


def digit_batch(g, n=8):
    """Bright or dark one-tile images; the answer after `<bos> <|image|> 5` says which (id 40 or 41)."""
    bright = torch.rand(n, generator=g) > 0.5
    pv = torch.randn(n, 1, 1, 3, 20, 20, generator=g) * 0.1
    pv[bright] += 1.0
    pv[~bright] -= 1.0
    ids = torch.tensor([[1, 2048, 5, 0]] * n)
    ids[:, 3] = torch.where(bright, 40, 41)
    cam = cross_attention_mask(ids.tolist(), [[1]] * n, 2048, 1, 4)
    return dict(
        input_ids=ids,
        pixel_values=pv,
        aspect_ratio_ids=torch.ones(n, 1, dtype=torch.long),
        aspect_ratio_mask=torch.ones(n, 1, 1, dtype=torch.long),
        cross_attention_mask=cam,
        labels=torch.where(torch.arange(4) == 3, ids, -100),  # the answer alone is scored
    )


def test_alignment_stage_moves_the_gates_and_the_answers():
    cfg = tiny_config(max_num_tiles=1)
    model = omnilm.build(cfg).train()
    trainable = alignment_parameters(model)
    assert trainable and all(
        n.startswith(("language_model.model.layers.1.", "multi_modal_projector.")) for n in trainable
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    gate = model.language_model.model.layers[1].cross_attn_attn_gate
    assert gate.item() == 0.0  # fresh: the image has no effect yet
    g = torch.Generator().manual_seed(0)
    test = digit_batch(g, 16)

    def answers():
        with torch.no_grad():
            logits = model(**{k: v for k, v in test.items() if k != "labels"}).logits[:, 2, 40:42]
        return (logits.argmax(-1) == (test["input_ids"][:, 3] - 40)).float().mean().item()

    before = answers()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        loss = model(**digit_batch(g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(gate.item()) > 0.01  # the gates moved off 0
    assert answers() == 1.0 and before < 1.0  # and the image now decides the answer
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(transformers.MllamaForConditionalGeneration(hf_config()).eval())
    path = tmp_path_factory.mktemp("mllama_lora")
    model.save_pretrained(path)
    return path


def test_lora_on_cross_attention_loads_in_peft(hf_dir, tmp_path):
    from peft import PeftModel

    model = omnilm.load(hf_dir)
    wrapped = apply_lora(model, rank=4, alpha=8, modules=cross_attention_linears(model))
    assert len(wrapped) == 2 * 4
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in wrapped:
            m = model.get_submodule(name)
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"][0] == "model.language_model.layers.1.cross_attn.k_proj"  # exact names
    x = inputs([(2, 2)])
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(hf_dir).eval()
    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(**x).logits, peft(**x).logits
    assert (ours - theirs).abs().max() < 1e-4
