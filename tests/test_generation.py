"""The generation engine (prefill + cached decode, batching, stopping, streaming) and the text layer
(stop strings, incremental UTF-8 printing) on a tiny random decoder."""

import io

import pytest
import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.errors import ContextLengthError, OmniLMError
from omnilm.generation.text import TextStream, generate_text, print_stream, stream_text
from omnilm.tokenizers.text import TextTokenizer

VOCAB, CTX, PAD, EOS = 2048, 96, 0, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls gain nothing from a second thread, and on a shared machine its spinning costs seconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    # init std 0.2 (not 0.02): a tiny random model then produces varied tokens instead of one repeated id
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128, max_seq_len=CTX, rope_theta=10000.0, initializer_range=0.2,
            bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
        )
    )  # fmt: skip
    return omnilm.build(cfg, seed=0)


def prompt(n, seed=0, batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, eos_token_id=kw.pop("eos_token_id", []), **kw)


def test_top_k_1_equals_greedy(model):
    ids = prompt(10)
    sampled = model.generate(ids, max_new_tokens=20, temperature=0.8, top_k=1, seed=5, eos_token_id=[])
    assert torch.equal(sampled, greedy(model, ids, 20))
    assert len(set(sampled[0, 10:].tolist())) > 5  # a varied continuation, so the comparison means something


def test_seed_repeats_and_different_seeds_differ(model):
    ids = prompt(8, batch=2)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.9, eos_token_id=[])
    a, b, c = (model.generate(ids, seed=s, **kw) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy(model, ids, 24))


def test_cache_decode_equals_recomputation_on_a_padded_batch(model):
    ids, mask = prompt(12, batch=2), torch.ones(2, 12, dtype=torch.long)
    ids[1, :4], mask[1, :4] = PAD, 0
    out = greedy(model, ids, 16, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(2, 16, dtype=torch.long)], 1)
    # every new token is the argmax of one full forward pass (no cache) over what precedes it
    logits = model(input_ids=out[:, :-1], attention_mask=full_mask[:, :-1]).logits
    assert torch.equal(logits[:, 11:].argmax(-1), out[:, 12:])


def test_batched_equals_single_with_left_padding(model):
    a, b = prompt(14, seed=1), prompt(9, seed=2)
    batch = torch.full((2, 14), PAD)
    mask = torch.zeros(2, 14, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 5:], mask[1, 5:] = b[0], 1
    out = greedy(model, batch, 12, attention_mask=mask)
    assert torch.equal(out[0, 14:], greedy(model, a, 12)[0, 14:])
    assert torch.equal(out[1, 14:], greedy(model, b, 12)[0, 9:])


def test_per_row_stopping_pads_finished_rows(model):
    a, b = prompt(10, seed=3), prompt(10, seed=4)
    alone_a, alone_b = greedy(model, a, 16)[0, 10:], greedy(model, b, 16)[0, 10:]
    # make row a's 4th new token the eos id (one not produced earlier by either row)
    eos = next(t for t in alone_a[3:].tolist() if t not in alone_a[:3].tolist() + alone_b[:8].tolist())
    stop_a = alone_a.tolist().index(eos)
    out = model.generate(torch.cat([a, b]), max_new_tokens=16, eos_token_id=[eos, 9999], pad_token_id=PAD)
    new = out[:, 10:]
    assert torch.equal(new[0, : stop_a + 1], alone_a[: stop_a + 1])
    assert (new[0, stop_a + 1 :] == PAD).all()
    stop_b = alone_b.tolist().index(eos) if eos in alone_b.tolist() else 15
    assert torch.equal(new[1, : stop_b + 1], alone_b[: stop_b + 1])
    assert new.shape[1] == max(stop_a, stop_b) + 1  # generation ends once both rows finished


def test_generation_stops_when_every_row_produced_eos(model):
    ids = prompt(10, seed=3)
    first = greedy(model, ids, 8)[0, 10:]
    out = model.generate(ids, max_new_tokens=8, eos_token_id=int(first[2]))
    assert out.shape[1] == 10 + first.tolist().index(int(first[2])) + 1


def test_repetition_penalty_removes_repeats(model):
    ids = prompt(12, seed=5)
    plain = greedy(model, ids, 30)[0]
    assert len(set(plain.tolist())) < len(plain)  # greedy repeats tokens of its own output
    # a huge penalty makes every seen token lose to any unseen one with a positive logit
    penalized = greedy(model, ids, 30, repetition_penalty=1e6)[0]
    assert len(set(penalized[12:].tolist())) == 30
    assert not set(penalized[12:].tolist()) & set(ids[0].tolist())


def test_streaming_yields_the_tokens_of_generate(model):
    ids = prompt(10, seed=6, batch=2)
    kw = dict(max_new_tokens=15, temperature=0.9, top_k=50, min_p=0.01, seed=3, eos_token_id=[])
    streamed = torch.stack(list(model.stream(ids, **kw)), dim=1)
    assert torch.equal(streamed, model.generate(ids, **kw)[:, 10:])


def test_prompt_longer_than_context_raises(model):
    with pytest.raises(ContextLengthError, match=f"prompt of {CTX} tokens.*context of {CTX}"):
        model.generate(prompt(CTX), max_new_tokens=4)
    with pytest.raises(ContextLengthError):
        list(model.stream(prompt(CTX + 5)))
    out = greedy(model, prompt(CTX - 3), 50)  # fits: new tokens are capped at the context
    assert out.shape == (1, CTX)


def test_right_padding_is_refused(model):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.raises(OmniLMError, match="left padding"):
        model.generate(prompt(6, batch=2), attention_mask=mask)


@pytest.mark.slow
def test_compiled_decode_step_on_cpu_equals_eager(model):
    model = omnilm.build(model.config, seed=1)  # its own copy: the weights change below
    ids = prompt(10, seed=8)
    assert torch.equal(greedy(model, ids, 12, compile=True), greedy(model, ids, 12))
    # a batch of rows of different lengths goes through the compiled step with dynamic shapes
    ids, mask = prompt(11, seed=7, batch=2), torch.ones(2, 11, dtype=torch.long)
    ids[0, :3], mask[0, :3] = PAD, 0
    assert torch.equal(
        greedy(model, ids, 12, attention_mask=mask, compile=True), greedy(model, ids, 12, attention_mask=mask)
    )


# ---- text layer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.default()


def test_text_stream_never_splits_a_character(tok):
    text = "héllo wörld, 日本語 😀🚀 naïve café"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


class _WholeDecode:
    """The reference TextStream behaviour: decode every id so far at each push (O(n^2))."""

    def __init__(self, tok, stops):
        self.tok, self.stops, self.ids, self.emitted, self.stopped = (
            tok,
            [s for s in stops if s],
            [],
            0,
            False,
        )

    def push(self, i):
        if self.stopped:
            return ""
        self.ids.append(i)
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        hits = [j for j in (text.find(s, self.emitted) for s in self.stops) if j >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            hold = next((n for n in range(min(max(map(len, self.stops), default=1) - 1, len(text) - self.emitted), 0, -1)
                         if any(s.startswith(text[-n:]) for s in self.stops)), 0)  # fmt: skip
            end = len(text) - hold
        end = max(end, self.emitted)
        out, self.emitted = text[self.emitted : end], end
        return out


def test_incremental_decoding_equals_decoding_everything_at_each_token(tok):
    import random

    rng = random.Random(0)
    texts = [
        "héllo wörld, 日本語 😀🚀 naïve café",
        "The answer is 42.\nUser: next",
        "  spaces\tand\n\nlines  ",
    ]
    seqs = [tok.encode(t) for t in texts]
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(20)]  # broken bytes, specials
    for ids in seqs:
        for stops in ([], ["\nUser:"], ["é", "42"], [" a", "zz"]):
            ref, got = _WholeDecode(tok, stops), TextStream(tok, stops)
            assert [got.push(i) for i in ids] == [ref.push(i) for i in ids], (ids, stops)
            assert got.stopped == ref.stopped


def test_stop_string_ends_the_text_and_is_never_printed(tok):
    ids = tok.encode("The answer is 42.\nUser: next question")
    stream = TextStream(tok, stop_strings=["\nUser:", "never"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        assert "\nUs" not in "".join(pieces)  # a partial stop string is held back, not printed
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "The answer is 42."
    assert stream.finish() == ""


def test_held_back_text_is_flushed_when_no_stop_string_follows(tok):
    stream = TextStream(tok, stop_strings=["ab!"])
    out = "".join(stream.push(i) for i in tok.encode("xy a"))
    assert out + stream.finish() == "xy a"


def test_stream_text_and_print_stream_match_generate(model, tok):
    ids = torch.tensor([tok.encode("Once upon a time", add_bos=True)])
    T = ids.shape[1]
    new = greedy(model, ids, 24)[0, T:]
    full = tok.decode(new)
    buf = io.StringIO()
    assert print_stream(model, tok, ids, dict(max_new_tokens=24, eos_token_id=[]), out=buf) == full
    assert buf.getvalue() == full + "\n"
    # a stop string taken from the middle of the continuation cuts the text right before it
    stop = next(s for s in (tok.decode([t]) for t in new[8:]) if s.strip() and full.find(s) > 0)
    cut = "".join(stream_text(model, tok, ids, stop_strings=[stop], max_new_tokens=24, eos_token_id=[]))
    assert cut == full[: full.find(stop)]


def test_generate_text_stops_each_row_on_its_own(model, tok):
    ids = prompt(10, seed=9, batch=2)
    new = greedy(model, ids, 20)[:, 10:]
    full = [tok.decode(row) for row in new]
    stop = next(s for s in (tok.decode([t]) for t in new[0, 5:]) if s.strip() and full[0].find(s) > 0)
    texts = generate_text(model, tok, ids, stop_strings=[stop], max_new_tokens=20, eos_token_id=[])
    for got, want in zip(texts, full):
        assert got == (want[: want.find(stop)] if stop in want else want)


def test_grouped_query_attention_equals_sdpa():
    # the CUDA decode kernel for GQA with a mask, checked on CPU against SDPA with copied k and v
    from omnilm.models.common.attention import causal_mask, grouped_query_attention

    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False
    mask = causal_mask(torch.tensor([20]), 30, valid)  # (2, 1, 1, 30): slots past 20 and padding hidden
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask
    )
    assert (grouped_query_attention(q, k, v, mask) - ref).abs().max() < 1e-5
    q3 = torch.randn(2, 8, 3, 16)
    mask3 = causal_mask(torch.tensor([18, 19, 20]), 30, valid)
    ref3 = torch.nn.functional.scaled_dot_product_attention(
        q3, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask3
    )
    assert (grouped_query_attention(q3, k, v, mask3) - ref3).abs().max() < 1e-5


def test_generate_keeps_the_public_signature_and_a_passed_generation_config(model):
    """ARCHITECTURE.md's order (input_ids, attention_mask, max_new_tokens, ...) works positionally, and
    an explicit generation_config is not overridden by the keyword defaults."""
    from omnilm.generation import GenerationConfig

    ids = prompt(6, seed=11)
    assert model.generate(ids, None, 5, eos_token_id=[]).shape == (1, 11)
    cfg = GenerationConfig(max_new_tokens=7, temperature=1.0, top_k=50, seed=5, eos_token_id=[])
    sampled = model.generate(ids, generation_config=cfg)
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=7, temperature=1.0, top_k=50, seed=5,
                                               eos_token_id=[]))  # fmt: skip
    assert not torch.equal(sampled, model.generate(ids, max_new_tokens=7, eos_token_id=[]))  # not greedy
