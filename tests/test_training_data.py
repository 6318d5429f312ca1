import json

import pytest
import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.errors import ConfigError
from omnilm.tokenizers.text import TextTokenizer
from omnilm.training.config import load_train_config
from omnilm.training.data import (
    IGNORE,
    ResumableLoader,
    Sample,
    collate_rows,
    encode_messages,
    load_samples,
    pack,
    truncate,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops: one thread avoids OpenMP spin-waits, which dominate on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model():
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            rope_theta=10000.0,
        )
    )
    return omnilm.build(cfg, seed=0).float()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def token_loss_sum(model, batch):
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    ).logits
    labels = batch["labels"]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return ce, int((labels[:, 1:] != IGNORE).sum())


def test_packed_loss_equals_samples_alone(tmp_path):
    tok = TextTokenizer.default()
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "The cat sat on the mat and looked at the dog."},
            {
                "messages": [
                    {"role": "user", "content": "Name a color."},
                    {"role": "assistant", "content": "Blue."},
                ]
            },
            {"text": "Count: 1 2 3 4 5 6 7 8 9."},
            {"text": "A short one."},
        ],
    )
    samples = load_samples(data, tok)
    assert samples[1].labels.count(IGNORE) > 0 and samples[0].labels.count(IGNORE) == 0
    rows = pack(samples, seq_len=96)
    assert len(rows) == 1 and len(rows[0]) == 4  # all four share one row
    model = tiny_model()
    batch = collate_rows(rows, 96, pad_id=0)
    assert batch["attention_mask"].shape == (1, 1, 96, 96)
    assert batch["position_ids"][0, len(samples[0])] == 0  # positions restart per document
    with torch.no_grad():
        packed_sum, packed_n = token_loss_sum(model, batch)
        alone_sum, alone_n = 0.0, 0
        for s in samples:
            ids = torch.tensor([s.ids])
            logits = model(input_ids=ids).logits
            labels = torch.tensor([s.labels])
            alone_sum += torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum"
            )
            alone_n += int((labels[0, 1:] != IGNORE).sum())
    assert packed_n == alone_n
    torch.testing.assert_close(packed_sum / packed_n, alone_sum / alone_n, rtol=1e-5, atol=1e-6)
    # without the document mask the samples would see each other and the loss would differ
    with torch.no_grad():
        leaky = dict(batch, attention_mask=torch.ones(1, 1, 96, 96, dtype=torch.bool).tril())
        leaky_sum, _ = token_loss_sum(model, leaky)
    assert not torch.isclose(leaky_sum, packed_sum, rtol=1e-4)


def test_truncation_never_cuts_a_media_span():
    ids = list(range(100, 120))
    labels = list(ids)
    spans = [(4, 8), (10, 16)]
    media = [("image", torch.zeros(3, 2, 2)), ("image", torch.ones(3, 2, 2))]
    s = Sample(ids, labels, spans, media)
    cut = truncate(s, 12)  # 12 falls inside the second span: cut before it and drop its image
    assert len(cut) == 10 and cut.spans == [(4, 8)] and len(cut.media) == 1
    assert len(truncate(s, 17)) == 17 and len(truncate(s, 17).media) == 2
    assert truncate(Sample([1, 2, 3], [IGNORE, IGNORE, 5]), 2) is None  # nothing learnable left


def test_loader_resume_gives_the_same_batches():
    rows = [[Sample([1, 2 + i, 3], [1, 2 + i, 3])] for i in range(10)]

    def loader():
        return ResumableLoader(rows, 4, batch_size=4, pad_id=0, seed=3, micro_batches=2)

    a = loader()
    full = [a.next_batch() for _ in range(6)]  # crosses two epoch boundaries
    b = loader()
    for _ in range(2):
        b.next_batch()
    c = loader()
    c.load_state_dict(b.state_dict())
    for expected in full[2:]:
        got = c.next_batch()
        assert len(got) == 2
        for e, g in zip(expected, got):
            assert torch.equal(e["input_ids"], g["input_ids"])
    # a global batch is the same rows however it is split across processes
    halves = [ResumableLoader(rows, 4, 4, 0, seed=3, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert torch.equal(
        torch.cat([h["input_ids"] for h in halves]), torch.cat([m["input_ids"] for m in full[0]])
    )
    with pytest.raises(ConfigError, match="data or config changed"):
        ResumableLoader(rows[:5], 4, 4, 0, seed=3).load_state_dict(a.state_dict())


def test_media_paths_are_resolved_and_need_a_processor(tmp_path):
    (tmp_path / "img.png").write_bytes(b"not really")
    tok = TextTokenizer.default()
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "ok"},
    ]
    with pytest.raises(ConfigError, match="no processor"):
        encode_messages(msgs, tok, tmp_path)

    class FakeProcessor:
        def encode_media(self, kind, source):
            assert kind == "image" and source == str(tmp_path / "img.png")
            return [tok.image_token_id] * 3, torch.full((3, 4, 4), 0.5)

    s = encode_messages(msgs, tok, tmp_path, FakeProcessor())
    ((start, end),) = s.spans
    assert end - start == 3 and s.ids[start:end] == [tok.image_token_id] * 3
    assert all(lab == IGNORE for lab in s.labels[start:end])
    batch = collate_rows([[s]], 64, 0)
    assert batch["pixel_values"].shape == (1, 3, 4, 4)


def test_config_rejects_unknown_keys_and_bad_lines(tmp_path):
    (tmp_path / "c.yaml").write_text("model: tiny\ndata: {path: d.jsonl, seq_lenn: 3}\n")
    with pytest.raises(ConfigError, match="seq_lenn"):
        load_train_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("model: tiny\noptim: {lr: 3e-3}\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_train_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("model: tiny\noptim: {lr: 3e-3}\n")
    assert load_train_config(tmp_path / "c.yaml").optim.lr == 3e-3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        load_samples(bad, TextTokenizer.default())


def test_full_single_document_rows_use_plain_causal_attention():
    rows = [
        [Sample(list(range(10, 18)), list(range(10, 18)))],
        [Sample(list(range(20, 28)), list(range(20, 28)))],
    ]
    batch = collate_rows(rows, 8, pad_id=0)
    assert "attention_mask" not in batch and batch["labels"][0, 0] == IGNORE
    assert "attention_mask" in collate_rows(rows, 9, pad_id=0)  # padding needs the mask
