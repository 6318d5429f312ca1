"""`omnilm compose` from tiny random transformers parts, then the composed model end to end."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file
from test_cli_errors import make_parts

import omnilm

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    make_parts(root)  # tiny random Llama, SigLIP and Whisper directories
    img = Image.fromarray((np.indices((40, 40)).sum(0) * 3 % 256).astype(np.uint8)).convert("RGB")
    img.save(root / "a.png")
    t = np.arange(16000) / 16000
    soundfile.write(root / "a.wav", 0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t), 16000)
    return root


def test_compose_keeps_pretrained_weights_and_runs(parts, tmp_path):
    out = tmp_path / "omni"
    from omnilm.convert.compose import compose

    compose(parts / "llama", vision=parts / "siglip", audio=parts / "whisper", out=out)
    model = omnilm.load(out)
    siglip = load_file(parts / "siglip" / "model.safetensors")
    assert torch.equal(
        model.vision_tower.state_dict()["encoder.layers.1.mlp.fc1.weight"],
        siglip["encoder.layers.1.mlp.fc1.weight"],
    )
    llama = load_file(parts / "llama" / "model.safetensors")
    assert torch.equal(
        model.language_model.model.layers[1].mlp.up_proj.weight, llama["model.layers.1.mlp.up_proj.weight"]
    )

    processor = omnilm.load_processor(out)
    batch = processor(
        text="<|image|> and <|audio|> describe", images=[parts / "a.png"], audio=[parts / "a.wav"]
    )
    ids = batch["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == model.config.vision.tokens_per_image
    assert int((ids == model.config.audio_token_id).sum()) == model.config.audio.tokens_per_window
    logits = model(**batch).logits
    assert logits.shape == (1, ids.shape[1], model.config.decoder.vocab_size)
    assert torch.isfinite(logits).all()
    # the image really changes the output: a different image gives different logits after it
    other = processor(
        text="<|image|> and <|audio|> describe",
        images=[Image.new("RGB", (32, 32), "red")],
        audio=[parts / "a.wav"],
    )
    assert not torch.allclose(model(**other).logits[0, -1], logits[0, -1])


def test_cli_compose_and_generate_with_media(parts, tmp_path):
    out = tmp_path / "cli"
    run = [sys.executable, "-m", "omnilm"]
    r = subprocess.run(
        run
        + ["compose", "--text", str(parts / "llama"), "--vision", str(parts / "siglip"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        run
        + [
            "generate",
            "--model",
            str(out),
            "--image",
            str(parts / "a.png"),
            "--image",
            str(parts / "a.png"),
            "--prompt",
            "compare",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    r = subprocess.run(
        run + ["generate", "--model", str(out), "--image", str(tmp_path / "bad.png"), "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
