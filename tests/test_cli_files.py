"""`omnilm generate --file ...`: documents, notes, images and audio given as files reach the prompt.

The model is the tiny composed one of test_cli_errors (Llama + SigLIP + Whisper, shared per session).
"""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from test_cli_errors import composed_model, run_cli

import omnilm
from omnilm.processing.documents import build_pdf

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return composed_model(tmp_path_factory)


def _digit_like(seed, size=24):
    """A non-constant picture (a noisy ring), different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    ring = (np.abs(np.hypot(yy, xx) - size / 3) < 2.5) * 200
    return Image.fromarray((ring[..., None] + rng.integers(0, 50, (size, size, 3))).astype(np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    pdf = build_pdf([
        [("text", "Invoice 42 for Ada"), ("image", _digit_like(0)), ("text", "Total due 17 dollars")],
        [("image", _digit_like(1)), ("text", "Signed on page two")],
    ])  # fmt: skip
    (root / "doc.pdf").write_bytes(pdf)
    (root / "notes.md").write_text("# Notes\n\nAda paid *half* already.\n")
    _digit_like(2).save(root / "photo.png")
    t = np.arange(8000) / 16000
    soundfile.write(root / "clip.wav", 0.3 * np.sin(2 * np.pi * (300 + 500 * t) * t), 16000)
    return root


def test_pdf_and_notes_through_the_cli(model_dir, files, monkeypatch, capsys):
    """The CLI's prompt batch holds the PDF's text, its two images as placeholder runs in page order,
    and the notes; it equals the Python API's processor call."""
    from omnilm.pipeline import Pipeline

    seen = {}
    real = Pipeline.encode

    def spy(self, *args, **kwargs):
        seen["prompt"] = prompt = real(self, *args, **kwargs)
        return prompt

    monkeypatch.setattr(Pipeline, "encode", spy)
    prompt = "Who paid and how much is due?"
    rc, out, err = run_cli(
        capsys, "generate", "--model", model_dir, "--file", files / "doc.pdf", "--file", files / "notes.md",
        "--prompt", prompt, "--max-new-tokens", 3,
    )  # fmt: skip
    assert rc == 0 and err == "", err
    assert out.endswith("\n")

    processor = omnilm.load_processor(model_dir)
    batch = processor(text=prompt, files=[files / "doc.pdf", files / "notes.md"])
    assert seen["prompt"].ids == batch["input_ids"][0].tolist()
    assert torch.equal(seen["prompt"].media["pixel_values"], batch["pixel_values"])

    cfg = omnilm.load(model_dir).config
    ids = batch["input_ids"][0]
    is_image = ids == cfg.image_token_id
    assert int(is_image.sum()) == 2 * cfg.vision.tokens_per_image
    assert batch["pixel_values"].shape == (2, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert batch["input_features"] is None
    # the two images are separate runs at their places in the page flow: text, image, text, image, text
    first = int(is_image.nonzero()[0])
    runs = torch.diff(is_image.int()).nonzero().flatten() + 1  # where a run starts or ends
    assert len(runs) == 4
    tok = processor.tokenizer
    before, between = tok.decode(ids[:first].tolist()), tok.decode(ids[runs[1] : runs[2]].tolist())
    after = tok.decode(ids[runs[3] :].tolist())
    assert "Invoice 42 for Ada" in before and "Total due" not in before
    assert "Total due 17 dollars" in between
    assert "Signed on page two" in after and "Ada paid *half* already." in after
    assert after.index("Signed on page two") < after.index("Ada paid") < after.index(prompt)
    # the PDF's first image is the one the processor made of it (pixels of the decoded embedded image)
    expected = processor.image_processor([_digit_like(0)])[0]
    assert torch.allclose(batch["pixel_values"][0], expected, atol=1e-6)


def test_mixed_kinds_in_a_real_process(model_dir, files):
    """`--file` repeatable and mixing kinds (PDF, Markdown, PNG, WAV), run as the real program."""
    r = subprocess.run(
        [sys.executable, "-m", "omnilm", "generate", "--model", str(model_dir), "--prompt", "summarize",
         "--file", str(files / "doc.pdf"), "--file", str(files / "notes.md"),
         "--file", str(files / "photo.png"), "--file", str(files / "clip.wav"), "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "error" not in r.stderr
    processor = omnilm.load_processor(model_dir)
    batch = processor(
        text="summarize", files=[files / f for f in ("doc.pdf", "notes.md", "photo.png", "clip.wav")]
    )
    ids = batch["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == 3 * processor.tokens_per_image
    assert int((ids == processor.audio_token_id).sum()) == processor.tokens_per_audio_window
    assert batch["pixel_values"].shape[0] == 3 and batch["input_features"].shape[0] == 1
    # the file's media follow the file order: the PNG's image run comes before the WAV's audio run
    last_image = int((ids == processor.image_token_id).nonzero()[-1])
    assert last_image < int((ids == processor.audio_token_id).nonzero()[0])
