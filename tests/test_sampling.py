"""The sampling functions on constructed distributions."""

import math

import torch

from omnilm.generation.sampling import (
    apply_repetition_penalty,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)


def logits_of(probs):
    return torch.tensor(probs).log()[None]  # (1, V)


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.randn(8, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature=1.5, top_k=1, generator=g), logits.argmax(-1))
    kept = top_k_filter(logits, 1).isfinite()  # the filter alone leaves exactly the argmax
    assert torch.equal(kept.sum(-1), torch.ones(8, dtype=torch.long))
    assert kept.gather(1, logits.argmax(-1, keepdim=True)).all()


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(4, 30)
    out = top_k_filter(logits, 5)
    assert torch.equal(out.isfinite(), logits >= logits.topk(5).values[:, -1:])
    assert torch.equal(out[out.isfinite()], logits[out.isfinite()])


def test_top_p_never_samples_outside_the_nucleus():
    # sorted mass 0.4, 0.3 (= 0.7), 0.15 (= 0.85): p = 0.8 keeps exactly the first three tokens
    probs = [0.05, 0.4, 0.02, 0.15, 0.3, 0.08]
    logits = logits_of(probs).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_p=0.8, generator=g)
    counts = torch.bincount(draws, minlength=6)
    assert set(draws.unique().tolist()) == {1, 3, 4}
    # and within the nucleus the renormalised probabilities hold: 0.4/0.85, 0.15/0.85, 0.3/0.85
    freq = counts[[1, 3, 4]].float() / 20000
    assert torch.allclose(freq, torch.tensor([0.4, 0.15, 0.3]) / 0.85, atol=0.015)


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_p():
    out = top_p_filter(logits_of([0.1, 0.9]), 0.5)
    assert out.isfinite().tolist() == [[False, True]]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = [0.5, 0.2, 0.04, 0.26]  # min_p 0.1: threshold 0.05 drops only the 0.04
    out = min_p_filter(logits_of(probs), 0.1)
    assert out.isfinite().tolist() == [[True, True, False, True]]
    g = torch.Generator().manual_seed(1)
    draws = sample(logits_of(probs).expand(5000, -1), temperature=1.0, min_p=0.45, generator=g)
    assert set(draws.unique().tolist()) == {0, 3}  # threshold 0.225: 0.5 and 0.26 remain


def test_fixed_seed_repeats_and_different_seeds_differ():
    logits = torch.randn(4, 1000)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(logits, temperature=1.0, top_p=0.95, generator=g) for _ in range(8)])

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_temperature_sharpens_the_distribution():
    logits = logits_of([0.6, 0.3, 0.1]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    cold = torch.bincount(sample(logits, temperature=0.5, generator=g), minlength=3).float() / 20000
    expected = torch.tensor([0.36, 0.09, 0.01]) / 0.46  # p^(1/T) renormalised
    assert torch.allclose(cold, expected, atol=0.015)


def test_repetition_penalty_changes_a_repeated_greedy_choice():
    logits = torch.tensor([[2.0, 1.8, -1.0, -0.5]])
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(logits, seen, 1.3)
    assert sample(logits).item() == 0 and sample(out).item() == 1
    # positive seen logits are divided, negative ones multiplied, unseen ones untouched
    assert torch.allclose(out, torch.tensor([[2.0 / 1.3, 1.8, -1.3, -0.5]]))
    assert math.isclose(apply_repetition_penalty(logits, seen, 1.0).sum().item(), logits.sum().item())
