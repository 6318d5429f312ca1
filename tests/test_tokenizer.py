import json
import random

import pytest

from omnilm.cli import main
from omnilm.config import get_preset
from omnilm.errors import ConfigError
from omnilm.tokenizers.chat import render_chat, render_chat_with_media
from omnilm.tokenizers.text import SPECIAL_TOKENS, TextTokenizer, train_tokenizer

SAMPLES = [
    "which digit is this?",
    "The document says the total is 1234.56 dollars.",
    "  leading and trailing spaces\tand\ttabs\n\nnew paragraph  ",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code",
    "héllo wörld — naïve café, 日本語, emoji 🙂👍",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.default()


def test_default_matches_tiny_preset(tok):
    dec = get_preset("tiny").decoder
    assert tok.vocab_size == dec.vocab_size == 2048
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        dec.pad_token_id,
        dec.bos_token_id,
        dec.eos_token_id,
    )
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.image_token_id == tok.token_to_id("<|image|>") and tok.audio_token_id == tok.token_to_id(
        "<|audio|>"
    )


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_token_id] + ids


def test_default_is_a_real_bpe(tok):
    # Trained merges: common words are single tokens, digits are split one per token.
    assert len(tok.encode("which digit is this?")) <= 6
    assert tok.encode("31415") == [tok.token_to_id(c) for c in "31415"]


def test_user_text_cannot_produce_special_ids(tok):
    text = "<|begin_of_text|>hi<|image|><|audio|><|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.image_token_id not in ids and tok.audio_token_id not in ids
    assert tok.decode(ids) == text


def test_decode_skips_special_only_when_asked(tok):
    ids = [tok.bos_token_id, *tok.encode("draw a 7"), tok.eos_token_id]
    assert tok.decode(ids) == "draw a 7"
    assert tok.decode(ids, skip_special=False) == "<|begin_of_text|>draw a 7<|end_of_text|>"


def test_chat_loss_mask_is_exactly_the_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "You read digits."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "which digit is this?"},
            ],
        },
        {"role": "assistant", "content": "It is a 7."},
        {
            "role": "user",
            "content": [{"type": "audio", "audio": "b.wav"}, {"type": "text", "text": "and this?"}],
        },
        {"role": "assistant", "content": "The number dialled was 123."},
    ]
    ids, mask = render_chat(messages, tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id
    # The masked positions form two spans: each assistant's content followed by its <|eot_id|>.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s, skip_special=False) for s in spans] == [
        "It is a 7.<|eot_id|>",
        "The number dialled was 123.<|eot_id|>",
    ]
    assert ids.count(tok.image_token_id) == 1 and ids.count(tok.audio_token_id) == 1
    text = tok.decode(ids, skip_special=False)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou read digits.<|eot_id|>"
    )


def test_chat_generation_prompt_and_media_order(tok):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": "x.wav"},
                {"type": "image", "image": "y.png"},
                {"type": "text", "text": "<|image|>"},
            ],
        }
    ]
    ids, mask, media = render_chat_with_media(messages, tok, add_generation_prompt=True)
    assert media == [("audio", "x.wav"), ("image", "y.png")]
    assert ids.count(tok.image_token_id) == 1  # the typed "<|image|>" stays plain text
    assert sum(mask) == 0
    assert tok.decode(ids, skip_special=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_bad_messages(tok):
    with pytest.raises(ConfigError, match="messages\\[0\\]"):
        render_chat([{"content": "no role"}], tok)
    with pytest.raises(ConfigError, match="unknown type 'video'"):
        render_chat([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], tok)


def test_tokenizer_train_cli_on_a_temp_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyzéü") for _ in range(rng.randint(2, 9)))
        for _ in range(500)
    ]
    lines = [
        " ".join(rng.choice(words) for _ in range(12)) + f" the quick brown fox {i}." for i in range(400)
    ]
    corpus.write_text("\n".join(lines))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)]) in (
        0,
        None,
    )
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|begin_of_text|>" and cfg["pad_token"] == "<|pad|>"
    tok = TextTokenizer.from_dir(out)
    assert tok.vocab_size == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok.encode("the quick brown fox")
    assert len(ids) < len("the quick brown fox") // 2  # merges were learned from the corpus
    assert tok.decode(ids) == "the quick brown fox"


def test_train_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 400, tmp_path / "out")
    (tmp_path / "c.txt").write_text("abc")
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer([tmp_path / "c.txt"], 100, tmp_path / "out")
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        TextTokenizer.from_dir(tmp_path)


def test_transformers_interop_both_ways(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    # transformers reads OmniLM's files with the same ids (bos added by the post-processor) ...
    hf = PreTrainedTokenizerFast.from_pretrained(str(tok.source).rsplit("/", 1)[0])
    text = "The document says 42. héllo 🙂"
    assert hf(text).input_ids == tok.encode(text, add_bos=True)
    assert hf.pad_token_id == tok.pad_token_id
    # ... and OmniLM reads what transformers saves.
    hf.save_pretrained(tmp_path)
    again = TextTokenizer.from_dir(tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_token_id, again.eos_token_id, again.image_token_id) == (1, 2, tok.image_token_id)


def test_foreign_tokenizer_without_modality_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "Ġ": 4}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    foreign = TextTokenizer.from_dir(tmp_path)
    assert (foreign.bos_token_id, foreign.eos_token_id, foreign.image_token_id) == (0, 1, None)
    assert foreign.encode("ab b") == [2, 3, 4, 3]
    with pytest.raises(ConfigError, match="start_header"):
        render_chat([{"role": "user", "content": "ab"}], foreign)
