"""The decode lanes (paged.Lanes) give exactly the tokens of gathering every row's pages each step,
while rows join, finish and are cancelled (lanes move) and the lanes grow."""

import random

import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.generation import Engine, GenerationConfig


def _run(model, lanes: bool):
    rng = random.Random(0)
    engine = Engine(model, max_batch=6, max_queue=32, page_size=4)
    if not lanes:
        engine.lanes = None
    reqs, step = [], 0
    while len(reqs) < 14 or engine.has_work():
        if len(reqs) < 14 and step % 3 == 0:  # staggered arrivals, mixed greedy / sampled / penalized
            prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
            cfg = GenerationConfig(
                max_new_tokens=rng.randrange(1, 30),
                temperature=rng.choice([0.0, 0.0, 0.8]),
                seed=len(reqs),
                repetition_penalty=rng.choice([None, 1.3]),
                eos_token_id=[],
            )
            reqs.append(engine.submit(prompt, cfg))
        if step == 9:
            reqs[1].cancel()
        engine.step()
        step += 1
    assert engine.pool.used == 0
    return [r.output for r in reqs]


def test_lanes_equal_gather():
    torch.manual_seed(0)
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=512,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            max_seq_len=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    model = omnilm.build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert _run(model, lanes=True) == _run(model, lanes=False)
