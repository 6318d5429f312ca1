"""The demo: its offline data (DTMF, PDFs, digits) and the quick end-to-end run through the CLI."""

import json

import numpy as np
import pytest
import torch

from omnilm.demo.data import DTMF, dtmf_clip, load_digits, random_number, render_digit


def _dominant_pair(segment: np.ndarray, rate: int) -> tuple[int, int]:
    """The DTMF row and column frequencies with the most energy in a segment (Goertzel by FFT)."""
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    freqs = np.fft.rfftfreq(len(segment), 1 / rate)

    def energy(f):
        return spectrum[np.abs(freqs - f) < 15].sum()

    rows, cols = (697, 770, 852, 941), (1209, 1336, 1477)
    return max(rows, key=energy), max(cols, key=energy)


def test_dtmf_clip_holds_the_dialled_digits_in_order():
    rng = np.random.default_rng(3)
    rate = 16000
    for _ in range(5):
        digits = random_number(rng, 3, 5)
        wav = dtmf_clip(digits, rng, rate, max_seconds=1.0)
        assert 0 < len(wav) <= rate and np.isfinite(wav).all()
        # tones are where the smoothed envelope is loud; split them at the gaps
        env = np.convolve(np.abs(wav), np.ones(160) / 160, mode="same")
        loud = env > 0.5 * env.max() * 0.3
        edges = np.flatnonzero(np.diff(loud.astype(int)))
        starts, ends = edges[::2] + 1, edges[1::2] + 1
        segments = [wav[s:e] for s, e in zip(starts, ends) if e - s > 0.02 * rate]
        decoded = ""
        for seg in segments:
            pair = _dominant_pair(seg, rate)
            decoded += next(k for k, v in DTMF.items() if v == pair)
        assert decoded == digits


def test_digits_split_and_render():
    train_x, train_y, test_x, test_y = load_digits(seed=0)
    assert len(train_x) + len(test_x) == 1797 and len(test_x) == 359
    assert set(np.unique(test_y)) == set(range(10))
    img = render_digit(train_x[0], 16)
    a = np.asarray(img)
    assert img.size == (16, 16) and a.shape == (16, 16, 3)
    assert a.min() < 100 and a.max() == 255  # dark ink on white paper


def test_pdf_samples_go_through_the_real_document_path():
    from omnilm.demo.data import TaskBuilder
    from omnilm.demo.train import build_processor, code_offset, model_config
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    cfg = model_config(tok)
    builder = TaskBuilder(build_processor(cfg, tok), code_offset(cfg))
    train_x, train_y, _, _ = load_digits(seed=0)
    samples = builder.pdf_samples(train_x[:6], train_y[:6], np.random.default_rng(0))
    for s in samples:
        text = tok.decode(s.prompt)
        assert text.startswith("Invoice ") and " total " in text and text.endswith("?")
        assert s.prompt.count(cfg.image_token_id) == cfg.vision.tokens_per_image
        assert s.pixel_values.shape == (1, 3, 16, 16)
        assert tok.decode(s.answer) == s.target
        if "picture" in text:
            assert s.target in "0123456789"
        elif "total" in text.split("\n\n")[-1]:
            assert s.target == text.split(" total ")[1][:2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from omnilm.cli import main

    out = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    return out, main


def test_quick_demo_end_to_end(quick_run, capsys):
    out, main = quick_run
    # one thread: a fixed count keeps the figures repeatable, and on a busy machine two spin-wait
    assert main(["demo", "--quick", "--json", "--threads", "1", "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {
        "image_to_text_acc",
        "audio_to_text_acc",
        "pdf_qa_acc",
        "text_to_image_acc",
        "video_qa_acc",
        "train_seconds",
    }
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "train_seconds")
    # lower bounds a broken pipeline fails (chance: 0.1 for a digit). 600 steps are too few for the
    # dialled numbers (the full demo needs ~1000), so audio is only checked for well-formed answers below.
    assert metrics["image_to_text_acc"] >= 0.6
    assert metrics["pdf_qa_acc"] >= 0.4
    assert metrics["text_to_image_acc"] >= 0.4
    assert metrics["train_seconds"] > 0
    assert (out / "generated_digits.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["quick"] is True

    # the saved directory loads through the public API and answers
    import omnilm
    from omnilm.demo.data import render_digit

    model = omnilm.load(out / "model")
    processor = omnilm.load_processor(out / "model")
    _, _, test_x, test_y = load_digits(seed=0)
    right = 0
    for x, y in zip(test_x[:20], test_y[:20]):
        batch = processor(text="which digit is this?", images=[render_digit(x, 16)])
        ids = model.generate(batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=3)
        right += processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :]).strip() == str(y)
    assert right >= 10

    from omnilm.demo.data import dtmf_clip

    clip = dtmf_clip("4821", np.random.default_rng(5))
    batch = processor(text="which number was dialled?", audio=[clip], sampling_rate=16000)
    ids = model.generate(batch["input_ids"], input_features=batch["input_features"], max_new_tokens=7)
    answer = processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :]).strip()
    assert answer.isdigit() and 3 <= len(answer) <= 5


def test_video_and_sheet_samples_go_through_the_real_file_paths():
    from omnilm.demo.data import VIDEO_PROMPT, TaskBuilder
    from omnilm.demo.train import build_processor, code_offset, model_config
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    cfg = model_config(tok)
    builder = TaskBuilder(build_processor(cfg, tok), code_offset(cfg))
    train_x, train_y, _, _ = load_digits(seed=0)
    rng = np.random.default_rng(0)
    clips = builder.video_samples(train_x[:4], train_y[:4], rng)
    for s, label in zip(clips, train_y[:4]):
        # every 1 s clip at 2 frames/s gives one prompt: the training fast path reuses it
        assert s.prompt == clips[0].prompt
        text = tok.decode(s.prompt)
        assert text.index("<t=0.0s>") < text.index("<t=0.5s>") < text.index(VIDEO_PROMPT)
        assert s.prompt.count(cfg.image_token_id) == 2 * cfg.vision.tokens_per_image
        assert s.prompt.count(cfg.audio_token_id) == cfg.audio.tokens_per_window
        assert s.pixel_values.shape == (2, 3, 16, 16) and s.input_features.shape[0] == 1
        digit, number = s.target.split()
        assert digit == str(label) and number.isdigit() and tok.decode(s.answer) == s.target
    pix = torch.stack([clips[0].pixel_values] * 3)  # (3, 2, 3, H, W)
    fast = builder.video_samples_from_pixels(pix, [1, 2, 3], rng, clips[0].prompt)
    assert [s.target.split()[0] for s in fast] == ["1", "2", "3"] and fast[0].input_features.shape[0] == 1
    for s in builder.sheet_samples(4, rng):
        text = tok.decode(s.prompt)
        assert text.startswith("Sheet: Invoice\ninvoice | ") and s.target in text.split("\n\n")[0]


def test_demo_evaluates_the_bundled_model_unless_told_to_train(monkeypatch, capsys):
    import omnilm.demo as demo
    from omnilm.cli import main

    def no_training(*a, **k):
        raise AssertionError("omnilm demo without --train must not train")

    bundled = {k: 0.5 for k in demo.METRIC_KEYS}
    monkeypatch.setattr(demo, "run_demo", no_training)
    monkeypatch.setattr(demo, "evaluate_bundled", lambda **k: bundled)
    assert main(["demo", "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == bundled


def test_demo_threads_do_not_follow_the_load(monkeypatch):
    import os

    from omnilm.demo import pick_threads

    first = pick_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert pick_threads() == first == max(1, min(len(os.sched_getaffinity(0)), 8))


def test_demo_training_is_bitwise_repeatable():
    """Same seed and thread count: the same losses to the last bit (the demo's figures follow)."""
    from omnilm.demo.data import TaskBuilder
    from omnilm.demo.train import build_model, build_processor, code_offset, model_config, train_model
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    cfg = model_config(tok)
    builder = TaskBuilder(build_processor(cfg, tok), code_offset(cfg))
    train_x, train_y, _, _ = load_digits(seed=0)

    def image_fn(n, g):
        idx = torch.randint(0, len(train_x), (n,), generator=g).numpy()
        return builder.image_samples(train_x[idx], train_y[idx], np.random.default_rng(int(idx[0])))

    def audio_fn(n, g):
        return builder.audio_samples(
            n, np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
        )

    runs = []
    for _ in range(2):
        model = build_model(cfg, seed=0)
        stats = train_model(
            model,
            {"image": image_fn, "audio": audio_fn},
            4,
            {"image": 4, "audio": 4},
            tok.pad_token_id,
            seed=0,
            progress=False,
        )
        runs.append(stats["losses"])
    assert runs[0] == runs[1] and len(set(runs[0])) == 4
