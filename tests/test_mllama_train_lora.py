"""`omnilm train` with LoRA on the cross-attention projections of a Llama-3.2-Vision (Mllama)
directory: only those projections are wrapped, and the checkpoint's adapter (PEFT layout) over its
model/ directory gives transformers + peft the trained model's logits."""

import json

import pytest
import torch
import transformers
from test_mllama import hf_config, perturb

from omnilm.demo.digit_chats import write_digit_chats
from omnilm.training.config import train_config_from_dict
from omnilm.training.data import collate_rows
from omnilm.training.loop import Trainer

pytest.importorskip("peft")
pytest.importorskip("sklearn")

VOCAB = 2048  # the default tokenizer's size; <|image|> is the first extra embedding row
CROSS = [f"cross_attn.{leaf}" for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")]


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    cfg = hf_config()
    cfg.text_config.vocab_size = VOCAB
    cfg.image_token_index = VOCAB
    torch.manual_seed(0)
    model = perturb(transformers.MllamaForConditionalGeneration(cfg).eval())
    path = tmp_path_factory.mktemp("mllama_lora_train")
    model.save_pretrained(path / "model")
    write_digit_chats(path / "data", 16, "train", size=32)  # 32 px on 20 px tiles: 2 x 2 tiles
    return path


def test_lora_on_cross_attention_trains_and_loads_in_peft(mllama_dir, tmp_path):
    from peft import PeftModel

    cfg = train_config_from_dict(
        dict(
            model=str(mllama_dir / "model"),
            data=dict(path=str(mllama_dir / "data" / "train.jsonl"), seq_len=32, pack=False),
            steps=3,
            batch_size=4,
            lora=dict(rank=4, alpha=8, targets=CROSS),
            optim=dict(lr=1e-2, warmup_steps=0),
        )
    )
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    model = trainer.model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"language_model.model.layers.{i}.{t}.lora_{ab}.weight" for i in (1, 3) for t in CROSS for ab in "AB"
    )
    batch = trainer.loader.next_batch()[0]
    assert batch["pixel_values"].shape == (4, 1, 4, 3, 20, 20) and batch["aspect_ratio_ids"].min() > 0
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    adapter = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(
        f"model.language_model.layers.{i}.{t}" for i in (1, 3) for t in CROSS
    )
    sample = trainer.loader.rows[0][0]
    x = collate_rows([[sample]], len(sample), 0)
    x.pop("labels")
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(ckpt / "model").eval()
    peft = PeftModel.from_pretrained(hf, ckpt / "adapter").eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = model(**x).logits, peft(**x).logits
    assert (ours - theirs).abs().max() < 1e-4
    b = model.get_submodule("language_model.model.layers.1.cross_attn.q_proj").lora_B.weight
    assert b.abs().max() > 0  # the adapter trained (B starts at 0)
