"""Golden outputs that a refactor must not change (issue 11: one engine).

Each case builds a tiny model with fixed seeds and "hot" weights (perturbed well away from their
initial values, so greedy decoding does not repeat one token) and returns plain lists. They were
recorded with the code before the engine refactor (tests/assets/golden.json, written by
`python tests/golden_cases.py`) and must stay identical after it. Everything runs on one thread so
the floating-point reduction order, and hence every bit, is the same on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import omnilm
from omnilm.config import AudioConfig, DecoderConfig, DiscreteConfig, ModelConfig, VisionConfig, get_preset

GOLDEN = Path(__file__).parent / "assets" / "golden.json"
IMAGE_START = 8  # the default tokenizer's <|image_start|>


def heat(model, seed: int, scale: float = 4.0):
    """Perturb every weight by seeded noise, so logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.float().std() + 0.05))
    return model


def small_decoder(vocab=2048):
    return DecoderConfig(
        vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        max_seq_len=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def text_batch():
    model = heat(omnilm.build("tiny", seed=0), seed=1)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 2048, (5,), generator=g), torch.randint(3, 2048, (9,), generator=g)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = a, 1
    ids[1], mask[1] = b, 1
    return model, ids, mask, b


def text_row_alone(row: int, seed: int):
    """One row of the text batch sampled alone with `seed`, as the "sampled" case samples it."""
    model, ids, mask, _ = text_batch()
    prompt = ids[row][mask[row].bool()][None]
    return model.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=seed, eos_token_id=[])[
        0
    ].tolist()


def text_case():
    model, ids, mask, b = text_batch()
    out = {}
    out["greedy"] = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[]).tolist()
    out["sampled"] = model.generate(
        ids, attention_mask=mask, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3, eos_token_id=[]
    ).tolist()
    # each row alone with the same seed: what a per-request generator must give in a batch too
    out["sampled_alone"] = [
        model.generate(
            row[m.bool()][None], max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3, eos_token_id=[]
        )[0].tolist()
        for row, m in zip(ids, mask)
    ]
    out["penalty"] = model.generate(
        b[None], max_new_tokens=24, repetition_penalty=1.3, top_k=20, temperature=0.7, seed=4, eos_token_id=[]
    ).tolist()
    out["eos"] = model.generate(b[None], max_new_tokens=40, eos_token_id=out["greedy"][1][12]).tolist()
    return out


def llava_case():
    vision = VisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2
    )
    cfg = ModelConfig(decoder=small_decoder(), vision=vision, image_token_id=5)
    model = heat(omnilm.build(cfg, seed=10), seed=11)
    n = vision.tokens_per_image
    g = torch.Generator().manual_seed(12)
    text = lambda k: torch.randint(20, 2048, (k,), generator=g).tolist()  # noqa: E731
    prompt = [1] + text(4) + [5] * n + text(3) + [5] * n + text(5)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    ids = model.generate(torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=16, eos_token_id=[])
    return {"greedy": ids[0, len(prompt) :].tolist()}


def audio_case():
    audio = AudioConfig(kind="whisper", hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32)
    cfg = ModelConfig(decoder=small_decoder(), audio=audio, audio_token_id=6)
    model = heat(omnilm.build(cfg, seed=20), seed=21)
    n = audio.tokens_per_window
    g = torch.Generator().manual_seed(22)
    prompt = [1] + torch.randint(20, 2048, (3,), generator=g).tolist() + [6] * n + [30, 31]
    feats = torch.randn(1, 80, 3000, generator=g)
    ids = model.generate(torch.tensor([prompt]), input_features=feats, max_new_tokens=16, eos_token_id=[])
    return {"greedy": ids[0, len(prompt) :].tolist()}


def discrete_case():
    cfg = get_preset("tiny")
    cfg.discrete = DiscreteConfig(
        image_vocab_size=16, image_grid=3, audio_vocab_size=8, audio_codebooks=2, audio_frames=2
    )
    model = heat(omnilm.build(cfg, seed=30), seed=31)
    g = torch.Generator().manual_seed(32)
    text = torch.randint(20, 2000, (6,), generator=g).tolist()
    out = {}
    image_prompt = torch.tensor([[1] + text + [IMAGE_START]])
    out["guided"] = model.generate(
        image_prompt, max_new_tokens=11, guidance_scale=3.0, temperature=1.0, top_k=8, seed=5, eos_token_id=[]
    )[0].tolist()
    out["greedy_guided"] = model.generate(
        image_prompt, max_new_tokens=11, guidance_scale=2.0, eos_token_id=[]
    )[0].tolist()
    out["audio_span"] = model.generate(
        torch.tensor([[1] + text + [10]]), max_new_tokens=12, temperature=0.9, seed=7, eos_token_id=[]
    )[0].tolist()  # 10: <|audio_start|>; 4 codes, the end marker, then text again
    # free generation: text, and spans wherever the model opens one (greedy)
    out["free"] = model.generate(torch.tensor([[1] + text]), max_new_tokens=30, eos_token_id=[])[0].tolist()
    out["free_sampled"] = model.generate(
        torch.tensor([[1] + text]), max_new_tokens=30, temperature=1.0, seed=6, eos_token_id=[]
    )[0].tolist()
    return out


def training_case(tmp_dir):
    from omnilm.training.config import load_train_config
    from omnilm.training.loop import train

    cfg = load_train_config(Path(__file__).parent.parent / "examples" / "train_tiny.yaml")
    cfg.save_every = 1000
    history = train(cfg, Path(tmp_dir), max_steps=20, progress=False)
    return {"losses": [h["loss"] for h in history]}


def run_all(tmp_dir) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "text": text_case(),
            "llava": llava_case(),
            "audio": audio_case(),
            "discrete": discrete_case(),
            "training": training_case(tmp_dir),
        }
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps(run_all(d), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
