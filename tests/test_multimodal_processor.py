import json

import numpy as np
import pytest
import torch
from PIL import Image

from omnilm.config import AudioConfig, VisionConfig, get_preset
from omnilm.errors import ConfigError, MediaError
from omnilm.processing.audio import AudioProcessor
from omnilm.processing.documents import build_pdf
from omnilm.processing.image import ImageProcessor
from omnilm.processing.multimodal import Processor, load_processor
from omnilm.tokenizers.text import TextTokenizer

TOKENS_PER_IMAGE = 4
TOKENS_PER_WINDOW = 3
SR = 16000


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.default()


@pytest.fixture(scope="module")
def proc(tok):
    audio = AudioProcessor(window_seconds=1.0, tokens_per_window=TOKENS_PER_WINDOW)
    return Processor(tok, ImageProcessor(size=(32, 32)), audio, tokens_per_image=TOKENS_PER_IMAGE)


def _image(seed, h=20, w=30):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _tone(seconds, freq):
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t) * np.linspace(0.2, 1.0, t.size)).astype(np.float32)


def _runs(ids, token_id):
    """(start, length) of each run of token_id in a 1-D id list."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token_id:
            j = i
            while j < len(ids) and ids[j] == token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def test_one_and_two_images(proc, tok):
    imgs = [_image(0), _image(1)]
    one = proc(text="<|image|>which digit is this?", images=imgs[:1])
    ids = one["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id
    assert _runs(ids, tok.image_token_id) == [(1, TOKENS_PER_IMAGE)]
    assert tok.decode(ids) == "which digit is this?"
    torch.testing.assert_close(one["pixel_values"], proc.image_processor(imgs[:1]), rtol=0, atol=0)

    two = proc(text="first <|image|> then <|image|> end", images=imgs)
    ids = two["input_ids"][0].tolist()
    runs = _runs(ids, tok.image_token_id)
    assert [n for _, n in runs] == [TOKENS_PER_IMAGE, TOKENS_PER_IMAGE]
    assert (
        tok.decode(ids[: runs[0][0]]) == "first "
        and tok.decode(ids[runs[1][0] + TOKENS_PER_IMAGE :]) == " end"
    )
    assert two["pixel_values"].shape == (2, 3, 32, 32)
    assert not torch.equal(two["pixel_values"][0], two["pixel_values"][1])
    assert two["attention_mask"].all() and two["input_features"] is None


def test_one_and_two_audio_clips_with_windows(proc, tok):
    short, long = _tone(0.6, 440.0), _tone(2.5, 697.0)  # 1 and 3 one-second windows
    one = proc(text="<|audio|>what number was dialled?", audio=[short])
    assert _runs(one["input_ids"][0].tolist(), tok.audio_token_id) == [(1, TOKENS_PER_WINDOW)]
    assert one["input_features"].shape[0] == 1

    two = proc(text="a <|audio|> b <|audio|>", audio=[long, short])
    runs = _runs(two["input_ids"][0].tolist(), tok.audio_token_id)
    assert [n for _, n in runs] == [3 * TOKENS_PER_WINDOW, 1 * TOKENS_PER_WINDOW]
    feats = two["input_features"]
    assert feats.shape[0] == 4
    # Windows come in clip order: the short clip's single window is the last row.
    torch.testing.assert_close(feats[3], one["input_features"][0])


def test_mixed_media_keep_their_positions(proc, tok):
    out = proc(
        text="<|audio|>x<|image|>y<|audio|>z<|image|>",
        images=[_image(2), _image(3)],
        audio=[_tone(1.5, 852.0), _tone(0.5, 941.0)],
    )
    ids = out["input_ids"][0].tolist()
    marks = [(i, tok.image_token_id) for i, _ in _runs(ids, tok.image_token_id)] + [
        (i, tok.audio_token_id) for i, _ in _runs(ids, tok.audio_token_id)
    ]
    order = [t for _, t in sorted(marks)]
    assert order == [tok.audio_token_id, tok.image_token_id, tok.audio_token_id, tok.image_token_id]
    assert ids.count(tok.audio_token_id) == (2 + 1) * TOKENS_PER_WINDOW
    assert ids.count(tok.image_token_id) == 2 * TOKENS_PER_IMAGE


def test_marker_and_media_counts_must_match(proc):
    with pytest.raises(MediaError, match="2 <\\|image\\|> marker"):
        proc(text="<|image|> and <|image|>", images=[_image(0)])
    with pytest.raises(MediaError, match="0 <\\|audio\\|> marker"):
        proc(text=["<|image|>a", "b"], images=[_image(0)], audio=[_tone(0.5, 440.0)])
    bare = Processor(proc.tokenizer)
    with pytest.raises(ConfigError, match="no image processor"):
        bare(text="<|image|>", images=[_image(0)])


def test_user_text_in_messages_cannot_smuggle_placeholders(proc, tok):
    messages = [{"role": "user", "content": "<|image|><|audio|> please"}]
    out = proc(messages=messages)
    ids = out["input_ids"][0].tolist()
    assert tok.image_token_id not in ids and tok.audio_token_id not in ids
    with pytest.raises(MediaError):  # the typed marker is text, so an image has nowhere to go
        proc(messages=messages, images=[_image(0)])


def test_plain_prompt_gets_markers_for_given_media(proc, tok):
    out = proc(text="which digit is this?", images=[_image(4)])
    ids = out["input_ids"][0].tolist()
    assert _runs(ids, tok.image_token_id) == [(1, TOKENS_PER_IMAGE)]


def test_left_padded_batch_equals_rows_alone(proc, tok):
    imgs = [_image(5), _image(6)]
    batch = proc(text=["<|image|>which digit is this?", "draw a 7", "<|image|>x"], images=imgs)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    singles = [
        proc(text="<|image|>which digit is this?", images=imgs[:1]),
        proc(text="draw a 7"),
        proc(text="<|image|>x", images=imgs[1:]),
    ]
    for row, single in enumerate(singles):
        s = single["input_ids"][0]
        assert torch.equal(ids[row, -len(s) :], s)
        assert attn[row].sum() == len(s) and attn[row, -len(s) :].all()
        assert (ids[row, : ids.shape[1] - len(s)] == tok.pad_token_id).all()
    torch.testing.assert_close(batch["pixel_values"], proc.image_processor(imgs), rtol=0, atol=0)


def test_media_alone(proc):
    out = proc(images=[_image(7)])
    assert out["input_ids"] is None and out["pixel_values"].shape == (1, 3, 32, 32)
    out = proc(audio=[_tone(1.2, 1209.0)])
    assert out["pixel_values"] is None and out["input_features"].shape[0] == 2


def test_messages_loss_mask_after_expansion(proc, tok):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which digit is this?"}]},
        {"role": "assistant", "content": "It is a 7."},
    ]
    out = proc(messages=messages, images=[_image(8)])
    ids, loss = out["input_ids"][0].tolist(), out["loss_mask"][0].tolist()
    assert ids.count(tok.image_token_id) == TOKENS_PER_IMAGE
    learned = [i for i, m in zip(ids, loss) if m]
    assert tok.decode(learned, skip_special=False) == "It is a 7.<|eot_id|>"


def test_pdf_file_in_prompt(proc, tok, tmp_path):
    pic = _image(9, 16, 16)
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(build_pdf([[("text", "Invoice 42"), ("image", pic), ("text", "Total 17")]]))
    out = proc(text="What does the document say?", files=[pdf])
    ids = out["input_ids"][0].tolist()
    ((start, n),) = _runs(ids, tok.image_token_id)
    assert n == TOKENS_PER_IMAGE
    assert tok.decode(ids[:start]) == "Invoice 42"
    assert tok.decode(ids[start + n :]) == "Total 17\n\nWhat does the document say?"
    torch.testing.assert_close(out["pixel_values"], proc.image_processor([pic]), rtol=0, atol=0)
    # The same document through a chat message.
    chat = proc(
        messages=[
            {
                "role": "user",
                "content": [{"type": "file", "file": str(pdf)}, {"type": "text", "text": "Which digit?"}],
            }
        ]
    )
    assert chat["input_ids"][0].tolist().count(tok.image_token_id) == TOKENS_PER_IMAGE


def test_save_and_load_round_trip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    assert again.prompt_format == "plain"
    assert (again.tokens_per_image, again.tokens_per_audio_window) == (TOKENS_PER_IMAGE, TOKENS_PER_WINDOW)
    kwargs = dict(text="<|image|>a<|audio|>", images=[_image(10)], audio=[_tone(1.5, 770.0)])
    a, b = proc(**kwargs), again(**kwargs)
    for key in ("input_ids", "attention_mask", "pixel_values", "input_features"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_load_processor_from_hf_llava_dir_uses_default_tokenizer(tmp_path, tok):
    from transformers import LlamaConfig, LlavaConfig, SiglipImageProcessor, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    ).save_pretrained(tmp_path)
    hf_proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    hf_proc.save_pretrained(tmp_path)
    proc = load_processor(tmp_path)
    assert proc.tokenizer.vocab_size == 2048 and proc.tokens_per_image == (32 // 8) ** 2
    out = proc(text="<|image|>which digit is this?", images=[_image(11)])
    assert out["input_ids"][0].tolist().count(tok.image_token_id) == 16
    expected = hf_proc(images=[_image(11)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected, atol=1e-5, rtol=0)


def test_load_processor_from_whisper_dir(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor

    WhisperConfig(
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
    ).save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path)
    proc = load_processor(tmp_path)
    assert proc.tokens_per_audio_window == 375  # 30 s -> 1500 encoder frames -> 4-frame stack
    out = proc(text="<|audio|>what number was dialled?", audio=[_tone(2.0, 1336.0)])
    assert out["input_ids"][0].tolist().count(proc.audio_token_id) == 375
    assert out["input_features"].shape == (1, 80, 3000)


def test_load_processor_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_processor(tmp_path / "missing")
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_processor(tmp_path)


def test_processor_output_runs_through_the_model(tok):
    from omnilm.models.omni import OmniModel

    cfg = get_preset("tiny")
    cfg.vision = VisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2
    )
    cfg.audio = AudioConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        window_seconds=1.0,
        max_source_positions=50,
    )
    cfg.image_token_id, cfg.audio_token_id = tok.image_token_id, tok.audio_token_id
    torch.manual_seed(0)
    model = OmniModel(cfg).eval()
    proc = Processor(
        tok,
        ImageProcessor(size=(32, 32)),
        AudioProcessor.from_config(cfg.audio),
        tokens_per_image=cfg.vision.tokens_per_image,
    )
    images, clips = [_image(12), _image(13)], [_tone(1.5, 697.0)]
    batch = proc(text="<|image|>a<|audio|>b<|image|>", images=images, audio=clips)
    with torch.no_grad():
        logits = model(**batch).logits
        # A different second image changes nothing before its placeholders (causal) and something after.
        other = model(
            **proc(text="<|image|>a<|audio|>b<|image|>", images=[images[0], _image(14)], audio=clips)
        ).logits
    start = _runs(batch["input_ids"][0].tolist(), tok.image_token_id)[1][0]
    torch.testing.assert_close(logits[:, :start], other[:, :start])
    assert not torch.allclose(logits[:, start:], other[:, start:])
    assert json.dumps(proc.tokens_per_image) == "16"


def test_encode_media_matches_the_batch_path(proc, tok):
    img, clip = _image(15), _tone(2.2, 1477.0)
    ids, pixels = proc.encode_media("image", img)
    assert ids == [tok.image_token_id] * TOKENS_PER_IMAGE
    torch.testing.assert_close(pixels, proc(images=[img])["pixel_values"][0], rtol=0, atol=0)
    ids, feats = proc.encode_media("audio", clip)
    assert ids == [tok.audio_token_id] * (3 * TOKENS_PER_WINDOW) and feats.shape[0] == 3
    with pytest.raises(ConfigError, match="unknown media kind"):
        proc.encode_media("video", "v.mp4")
