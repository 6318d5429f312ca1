"""The continuous-batching engine: a batch gives each request exactly its tokens alone, pages are
returned on finish and cancel, the queue is bounded, and a bad request fails alone."""

import random

import pytest
import torch
from golden_cases import heat

import omnilm
from omnilm.config import AudioConfig, DecoderConfig, DiscreteConfig, ModelConfig, VisionConfig
from omnilm.errors import ContextLengthError, OmniLMError, QueueFullError
from omnilm.generation import Engine, GenerationConfig

IMG, AUD, IMAGE_START, AUDIO_START = 5, 6, 8, 10  # placeholder ids, and the default tokenizer's markers


@pytest.fixture(scope="module")
def model():
    """Every input kind in one model: a vision tower, an audio encoder and discrete image/audio codes."""
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            max_seq_len=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),  # fmt: skip
        vision=VisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2
        ),  # fmt: skip
        audio=AudioConfig(kind="whisper", hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32),
        discrete=DiscreteConfig(
            image_vocab_size=16, image_grid=3, audio_vocab_size=8, audio_codebooks=2, audio_frames=2
        ),  # fmt: skip
        image_token_id=IMG,
        audio_token_id=AUD,
    )
    return heat(omnilm.build(cfg, seed=40), seed=41)


def text(g, n):
    return torch.randint(20, 2000, (n,), generator=g).tolist()


def make_requests(model):
    """16 requests: prompts of 1-300 tokens, greedy and seeded top-p/min-p/penalties, different
    lengths, an image prompt, an audio prompt and guided image spans."""
    g = torch.Generator().manual_seed(0)
    n_img, n_aud = model.config.vision.tokens_per_image, model.config.audio.tokens_per_window
    reqs = []
    lengths = [1, 7, 300, 33, 120, 2, 64, 250, 15, 90, 180, 5]
    settings = [
        dict(),
        dict(temperature=0.9, top_p=0.9, seed=1),
        dict(max_new_tokens=5),
        dict(temperature=1.0, top_k=30, seed=2, repetition_penalty=1.2),
        dict(temperature=0.7, min_p=0.1, seed=3, presence_penalty=0.5, frequency_penalty=0.3),
        dict(max_new_tokens=40),
        dict(temperature=0.8, seed=4, logprobs=3),
        dict(),
        dict(eos_token_id=None),
        dict(temperature=1.2, seed=5, max_new_tokens=9),
        dict(repetition_penalty=1.5),
        dict(temperature=0.5, top_p=0.5, seed=6),
    ]
    for n, s in zip(lengths, settings):
        reqs.append(
            ([1] + text(g, n - 1) if n > 1 else [1], GenerationConfig(**{"max_new_tokens": 16, **s}), {})
        )
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    reqs.append(([1] + text(g, 3) + [IMG] * n_img + text(g, 4) + [IMG] * n_img, GenerationConfig(max_new_tokens=12),
                 {"pixel_values": pixels}))  # fmt: skip
    feats = torch.randn(1, 80, 3000, generator=g)
    reqs.append(([1] + text(g, 2) + [AUD] * n_aud + text(g, 2), GenerationConfig(max_new_tokens=12, temperature=0.9,
                 seed=7), {"input_features": feats}))  # fmt: skip
    reqs.append(([1] + text(g, 5) + [IMAGE_START], GenerationConfig(max_new_tokens=11, guidance_scale=3.0,
                 temperature=1.0, top_k=8, seed=8), {}))  # fmt: skip
    reqs.append(
        ([1] + text(g, 4) + [AUDIO_START], GenerationConfig(max_new_tokens=10, temperature=1.0, seed=9), {})
    )
    return reqs


def run_alone(model, prompt, cfg, media):
    engine = Engine(model, max_batch=1)
    req = engine.submit(prompt, cfg, media)
    while engine.has_work():
        engine.step()
    assert engine.pool.used == 0
    return req.output, [ev.logprob for ev in []]


def test_batched_equals_alone_with_staggered_arrivals(model):
    reqs = make_requests(model)
    alone = [run_alone(model, *r)[0] for r in reqs]
    engine = Engine(model, max_batch=16, prefill_chunk=128)  # long prompts are prefilled in chunks
    submitted, order = [], list(range(len(reqs)))
    random.Random(0).shuffle(order)
    steps = most = 0
    while order or engine.has_work():
        if order and steps % 2 == 0:  # a new arrival every other step, while the others decode
            for _ in range(1 + steps % 3):
                if order:
                    i = order.pop()
                    submitted.append((i, engine.submit(*reqs[i])))
        engine.step()
        steps += 1
        most = max(most, len(engine.running))
        assert engine.pool.used == sum(
            len(s.pages) for r in engine.running + engine.prefilling for s in r.seqs
        )
    assert engine.pool.used == 0 and most >= 6  # it really batched
    for i, req in submitted:
        assert req.finish_reason in ("stop", "length")
        assert req.output == alone[i], f"request {i} differs in a batch"
    # the guided request produced one image span of exactly tokens_per_image codes
    d = model.config.discrete
    guided = dict(submitted)[14].output
    assert all(d.image_offset <= t < d.audio_offset for t in guided[:9]) and guided[9] == d.image_end_id


def test_logprobs_are_reported(model):
    engine = Engine(model)
    req = engine.submit([1, 50, 60], GenerationConfig(max_new_tokens=4, logprobs=2))
    while engine.has_work():
        engine.step()
    events = list(req.events())
    assert len(events) == 4 and all(ev.logprob <= 0 and len(ev.top_logprobs) == 2 for ev in events)
    assert events[0].top_logprobs[0][0] == events[0].token  # greedy: the best alternative is the choice


def test_cancel_frees_pages_at_once(model):
    engine = Engine(model, max_batch=4)
    keep = engine.submit([1, 30, 40], GenerationConfig(max_new_tokens=30))
    gone = engine.submit([1, 31, 41, 51], GenerationConfig(max_new_tokens=30))
    engine.step()
    engine.step()
    used = engine.pool.used
    pages = len(gone.seqs[0].pages)
    gone.cancel()
    engine.step()
    assert gone.finish_reason == "cancelled" and engine.pool.used == used - pages
    while engine.has_work():
        engine.step()
    assert keep.finish_reason == "length" and len(keep.output) == 30 and engine.pool.used == 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_page_pool_never_leaks_over_random_events(model, prefix_caching):
    rng = random.Random(1234)
    engine = Engine(model, max_batch=4, max_queue=8, num_pages=24, page_size=8, prefix_caching=prefix_caching)
    live, system = [], [1] + [rng.randrange(20, 2000) for _ in range(20)]  # prompts often share it
    for _ in range(200):
        event = rng.random()
        if event < 0.4:
            prompt = system[: rng.choice([1, 9, 21])] + [
                rng.randrange(20, 2000) for _ in range(rng.randrange(0, 25))
            ]
            try:
                live.append(engine.submit(prompt, GenerationConfig(max_new_tokens=rng.randrange(1, 20))))
            except QueueFullError:
                assert len(engine.waiting) == 8
        elif event < 0.55 and live:
            rng.choice(live).cancel()
        else:
            engine.step()
        live = [r for r in live if not r.finished]
        held = {p for r in engine.running + engine.prefilling for s in r.seqs for p in s.pages}  # shared once
        assert engine.pool.used == len(held) and 0 <= engine.pool.free <= engine.pool.num_pages
    for r in live:
        r.cancel()
    engine.step(admit=False)
    assert engine.pool.used == 0 and not engine.running and not engine.prefilling


def test_prefix_caching_shares_the_system_prompt_pages(model):
    g = torch.Generator().manual_seed(5)
    system = [1] + text(g, 47)  # 3 full pages of 16
    prompts = [system + text(g, 5), system + text(g, 9)]
    cfg = GenerationConfig(max_new_tokens=12)
    plain = [run_alone(model, p, cfg, {})[0] for p in prompts]
    engine = Engine(model, prefix_caching=True)
    first = engine.submit(prompts[0], cfg)
    engine.step()  # prefilled: its full prompt pages are registered
    used = engine.pool.used
    second = engine.submit(prompts[1], cfg)
    engine.step()
    shared = first.seqs[0].pages[:3]
    assert second.seqs[0].pages[:3] == shared  # shared, not computed again
    assert engine.pool.used - used == len(second.seqs[0].pages) - 3
    while engine.has_work():
        engine.step()
    assert [first.output, second.output] == plain and engine.pool.used == 0
    third = engine.submit(prompts[1], cfg)  # freed pages keep their contents until handed out again
    engine.step()
    assert third.seqs[0].pages[:3] == shared
    while engine.has_work():
        engine.step()
    assert third.output == plain[1]


def test_prompts_behind_a_cached_prefix_are_prefilled_together(model, monkeypatch):
    g = torch.Generator().manual_seed(6)
    system = [1] + text(g, 31)  # 2 full pages of 16
    prompts = [system + text(g, n) for n in (5, 5, 9, 5)]  # groups by (cached 32, length): 37 x3, 41 x1
    cfg = GenerationConfig(max_new_tokens=10)
    plain = [run_alone(model, p, cfg, {})[0] for p in prompts]
    engine = Engine(model, prefix_caching=True)
    warm = engine.submit(system + text(g, 3), cfg)
    engine.step()  # its full prompt pages are registered
    groups = []
    real = engine._forward_prefill_group
    monkeypatch.setattr(
        engine,
        "_forward_prefill_group",
        lambda s, t, rows: groups.append((s, t, len(rows))) or real(s, t, rows),
    )
    reqs = [engine.submit(p, cfg) for p in prompts]
    engine.step()  # one forward per (cached, length), not one per request
    assert sorted(groups) == [(32, 37, 3), (32, 41, 1)]
    while engine.has_work():
        engine.step()
    assert [r.output for r in reqs] == plain and len(warm.output) == 10 and engine.pool.used == 0


def test_full_queue_and_long_prompt_fail_alone(model):
    engine = Engine(model, max_batch=1, max_queue=2)
    running = engine.submit([1, 2000, 3], GenerationConfig(max_new_tokens=8, eos_token_id=[]))
    engine.step()  # admitted: the queue is empty again
    engine.submit([1, 5], GenerationConfig(max_new_tokens=2))
    engine.submit([1, 6], GenerationConfig(max_new_tokens=2))
    with pytest.raises(QueueFullError):
        engine.submit([1, 7], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ContextLengthError):
        engine.submit([1] * 600, GenerationConfig())
    while engine.has_work():
        engine.step()
    assert running.finish_reason == "length" and len(running.output) == 8


def test_bad_media_fails_alone(model):
    engine = Engine(model, max_batch=4)
    ok = engine.submit([1, 40, 50], GenerationConfig(max_new_tokens=6))
    n = model.config.vision.tokens_per_image
    bad = engine.submit([1] + [IMG] * n, GenerationConfig(), {"pixel_values": torch.rand(2, 3, 32, 32)})
    while engine.has_work():
        engine.step()
    assert bad.finish_reason == "error" and isinstance(bad.error, OmniLMError)
    assert ok.finish_reason == "length" and len(ok.output) == 6 and engine.pool.used == 0


def test_background_thread_serves_concurrent_submits(model):
    engine = Engine(model, max_batch=8)
    engine.start()
    try:
        reqs = [engine.submit([1, 100 + i], GenerationConfig(max_new_tokens=5)) for i in range(6)]
        outs = [[ev.token for ev in r.events(timeout=60)] for r in reqs]
    finally:
        engine.stop()
    alone = [run_alone(model, [1, 100 + i], GenerationConfig(max_new_tokens=5), {})[0] for i in range(6)]
    assert outs == alone


def test_generation_config_rejects_bad_values():
    for bad in (
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=0),
        dict(max_new_tokens=-2),
        dict(logprobs=99),
    ):
        with pytest.raises(OmniLMError):
            GenerationConfig(**bad)
    with pytest.raises(OmniLMError, match="unknown generation setting"):
        GenerationConfig().updated(temprature=1.0)


def test_a_fault_in_the_step_ends_requests_with_the_error(model, monkeypatch):
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        boom = RuntimeError("simulated out of memory")
        monkeypatch.setattr(engine, "_decode", lambda: (_ for _ in ()).throw(boom))
        reqs = [engine.submit([1, 40 + i], GenerationConfig(max_new_tokens=5)) for i in range(3)]
        last = [list(r.events(timeout=60))[-1] for r in reqs]
        assert all(ev.finish_reason == "error" and ev.error is boom for ev in last)
        assert engine.pool.used == 0
        monkeypatch.undo()  # the engine goes on serving
        ok = engine.submit([1, 50], GenerationConfig(max_new_tokens=3))
        assert [ev.finish_reason for ev in ok.events(timeout=60)][-1] == "length"
    finally:
        engine.stop()
