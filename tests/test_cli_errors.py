"""Bad input through the CLI: one line `error: ...` on stderr, exit code 2, no traceback, nothing lost.

Most cases run `omnilm.cli.main([...])` in-process (the code path of `python -m omnilm`); a few run
the real process to prove the process-level behaviour (exit status, stderr, no traceback).
"""

import hashlib
import io
import logging
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import omnilm
from omnilm.cli import main
from omnilm.errors import ConfigError
from omnilm.processing.documents import build_pdf
from omnilm.tokenizers.text import TextTokenizer

transformers = pytest.importorskip("transformers")
CONTEXT = 512  # the tiny Llama's max_position_embeddings: a prompt of a few hundred words overflows it


@pytest.fixture(autouse=True)
def quiet_pypdf():
    # pypdf logs its repair attempts on broken files; the tests look at the errors instead.
    logging.getLogger("pypdf").setLevel(logging.ERROR)


def make_parts(root):
    """Tiny random Llama, SigLIP and Whisper directories (the parts `omnilm compose` takes)."""
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    TextTokenizer.default().save(root / "llama")  # its tokenizer: a text model without one is refused
    siglip = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    transformers.SiglipVisionModel(siglip).save_pretrained(root / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    whisper = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=4,
        decoder_layers=1,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    transformers.WhisperModel(whisper).save_pretrained(root / "whisper")
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")


_BUILT = {}


def composed_model(tmp_path_factory):
    """`compose` of the tiny parts (Llama + SigLIP + Whisper), built once per test session: the CLI test
    modules share it (they never write to it; the tests check that a failed command leaves it as it was)."""
    if "dir" not in _BUILT:
        from omnilm.convert.compose import compose

        root = tmp_path_factory.mktemp("parts")
        make_parts(root)
        compose(root / "llama", vision=root / "siglip", audio=root / "whisper", out=root / "omni")
        _BUILT["dir"] = root / "omni"
    return _BUILT["dir"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return composed_model(tmp_path_factory)


def digest(path):
    """Hash of every file under path: a failed command must leave the model directory as it was."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *args):
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors leave through sys.exit
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, (rc, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in err.lower(), (n, err)


# ---- bad media files -----------------------------------------------------------------------------------


def _png(w=40, h=30):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(w=100_000, h=100_000):
    """A valid PNG header claiming w x h pixels, with a tiny (wrong) image data chunk: 70 bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _wav(seconds=1.0, rate=16000, subtype="PCM_16"):
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _wav_header_only():
    """A well-formed WAV with no samples (data chunk of size 0 after a complete header)."""
    return _wav(seconds=0.0)


def _pdf_image_bomb():
    """A PDF whose embedded image claims 90000 x 90000 pixels (the header is read, never the pixels)."""
    pdf = build_pdf([[("text", "big picture"), ("image", Image.new("RGB", (10, 10), "red"))]])
    return pdf.replace(b"/Width 10 /Height 10", b"/Width 90000 /Height 90000")


BAD_MEDIA = {
    # name: (option, file name, bytes, words the error must contain)
    "truncated png": ("--image", "cut.png", _png()[:200], ("cut.png", "truncated")),
    "png bomb": ("--image", "bomb.png", _png_bomb(), ("bomb.png",)),
    # 9000 x 6000 = 54 M pixels: under Pillow's own bomb limit, over OmniLM's 50 M pixel budget
    "png over the pixel budget": (
        "--image",
        "big.png",
        _png_bomb(9000, 6000),
        ("big.png", "exceeds the limit"),
    ),
    "not an image": (
        "--image",
        "junk.png",
        b"GIF? no. just some text bytes\n" * 4,
        ("junk.png", "PNG, JPEG"),
    ),
    "empty wav": ("--audio", "empty.wav", b"", ("empty.wav", "empty")),
    "wav without samples": ("--audio", "nosamples.wav", _wav_header_only(), ("nosamples.wav", "empty")),
    "truncated wav": ("--audio", "cut.wav", _wav(1.0)[:9000], ("cut.wav", "truncated")),
    # 10 min 40 s at 1 kHz, 8-bit: a genuinely long clip in 640 kB (the limit is 600 s)
    "over-long wav": ("--audio", "long.wav", _wav(640.0, rate=1000, subtype="PCM_U8"), ("long.wav", "600 s")),
    "not audio": ("--audio", "junk.wav", bytes(range(256)) * 8, ("junk.wav", "not a decodable audio")),
    "binary junk file": ("--file", "junk.bin", bytes(range(256)) * 8, ("junk.bin", "unsupported file kind")),
    "empty file": ("--file", "empty.txt", b"", ("empty.txt", "empty")),
    "corrupt pdf": (
        "--file",
        "corrupt.pdf",
        b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n",
        ("corrupt.pdf",),
    ),
    "truncated pdf": (
        "--file",
        "cut.pdf",
        build_pdf([[("text", "hello there")]])[:-60],
        ("cut.pdf", "truncated"),
    ),
    "pdf image bomb": ("--file", "bomb.pdf", _pdf_image_bomb(), ("bomb.pdf", "90000x90000")),
}


@pytest.mark.parametrize("case", list(BAD_MEDIA))
def test_bad_media_one_line_error(case, model_dir, tmp_path, capsys):
    option, name, data, needles = BAD_MEDIA[case]
    path = tmp_path / name
    path.write_bytes(data)
    before = digest(model_dir)
    rc, out, err = run_cli(capsys, "generate", "--model", model_dir, option, path, "--prompt", "describe")
    assert_one_line_error(rc, err, *needles)
    assert out == ""
    assert path.read_bytes() == data and digest(model_dir) == before


def _encrypted_pdf():
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(build_pdf([[("text", "secret plans")]]))))
    writer.encrypt(
        user_password="hunter2", owner_password="owner", algorithm="RC4-128"
    )  # AES would need `cryptography`
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def test_encrypted_pdf_in_a_real_process(model_dir, tmp_path):
    """The one-line error holds for the real process: exit status 2, stderr one line, no traceback."""
    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(_encrypted_pdf())
    r = subprocess.run(
        [sys.executable, "-m", "omnilm", "generate", "--model", str(model_dir), "--file", str(pdf)],
        capture_output=True,
        text=True,
    )
    assert_one_line_error(r.returncode, r.stderr, "locked.pdf", "encrypted")
    assert r.stdout == ""


# ---- bad checkpoints, presets, options, prompts ------------------------------------------------------


def test_prompt_longer_than_the_context(model_dir, capsys):
    prompt = " ".join(f"w{i}" for i in range(CONTEXT + 50))  # every word is at least one token
    rc, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", 2)
    assert_one_line_error(rc, err, "context", str(CONTEXT))


def test_missing_model_dir(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "generate", "--model", tmp_path / "nowhere", "--prompt", "hi")
    assert_one_line_error(rc, err, "nowhere")


def test_pickle_checkpoint_refused_unopened(model_dir, tmp_path, capsys):
    """A directory with only pytorch_model.bin: refused by name, and the pickle is never unpickled."""
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((model_dir.parent / "llama" / "config.json").read_text())
    # a pickle that would run code when loaded: if anything unpickles it, the marker file appears
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, ckpt / "pytorch_model.bin")
    for cmd in (
        ["generate", "--model", ckpt, "--prompt", "hi"],
        ["convert", "--model", ckpt, "--out", tmp_path / "o"],
    ):
        rc, _, err = run_cli(capsys, *cmd)
        assert_one_line_error(rc, err, "pickle")
    rc, _, err = run_cli(capsys, "generate", "--model", ckpt / "pytorch_model.bin", "--prompt", "hi")
    assert_one_line_error(rc, err, "pickle")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_checkpoint_with_wrong_shapes(model_dir, tmp_path, capsys):
    bad = tmp_path / "llama_bad"
    src = model_dir.parent / "llama"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    TextTokenizer.default().save(bad)
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :32].clone()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    rc, _, err = run_cli(capsys, "generate", "--model", bad, "--prompt", "hi")
    assert_one_line_error(rc, err, "shape", "up_proj")


def test_unknown_preset_and_usage_errors(model_dir, capsys):
    rc, _, err = run_cli(capsys, "plan", "--preset", "llama-9000")
    assert_one_line_error(rc, err, "llama-9000", "design-88b")
    for option, value in (
        ("--max-new-tokens", "0"),
        ("--max-new-tokens", "many"),
        ("--top-p", "7"),
        ("--temperature", "-1"),
    ):
        rc, _, err = run_cli(capsys, "generate", "--model", model_dir, option, value)
        assert_one_line_error(rc, err, option, value)
    rc, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--mfu", "0")  # was a ZeroDivisionError
    assert_one_line_error(rc, err, "--mfu")
    rc, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--dtype", "float8")
    assert_one_line_error(rc, err, "float8")
    for device in ("banana", "cuda:0"):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        rc, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--device", device)
        assert_one_line_error(rc, err, "--device", device.split(":")[0])
    rc, _, err = run_cli(
        capsys, "generate", "--model", model_dir, "--prompt", "<|image|> two markers <|image|>"
    )
    assert_one_line_error(rc, err, "2 <|image|> marker(s)", "0 image input(s)")


def test_unwritable_output_is_a_one_line_error(model_dir, tmp_path, capsys):
    """An --out below a plain file (an OSError from the filesystem) is a user error too."""
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    rc, _, err = run_cli(capsys, "convert", "--model", model_dir.parent / "llama", "--out", blocker / "sub")
    assert_one_line_error(rc, err, "a_file")
    assert blocker.read_text() == "keep me"


def test_usage_error_in_a_real_process(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "omnilm", "generate", "--model", str(tmp_path), "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
    )
    assert_one_line_error(r.returncode, r.stderr, "--max-new-tokens")


def test_multiline_error_messages_are_folded_to_one_line(model_dir, tmp_path, capsys):
    """A message with a newline in it (here a file name holding one) still prints as one line."""
    bad = tmp_path / "two\nlines.png"
    bad.write_bytes(_png()[:100])
    rc, _, err = run_cli(capsys, "generate", "--model", model_dir, "--image", bad, "--prompt", "hi")
    assert_one_line_error(rc, err, "two lines.png", "truncated")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }\n')
    rc, _, err = run_cli(capsys, "generate", "--model", cfg, "--prompt", "hi")
    assert_one_line_error(rc, err, "config.json")


# ---- wrong tensor shapes through the Python API -------------------------------------------------------


def test_forward_rejects_wrong_shapes_naming_the_argument(model_dir):
    model = omnilm.load(model_dir)
    v, a = model.config.vision, model.config.audio
    ids = torch.tensor([[1, 5, 6, 7]])
    good_pixels = torch.randn(1, 3, v.image_size, v.image_size)
    cases = {
        "input_ids": dict(input_ids=torch.tensor([1, 5, 6])),  # (T,) instead of (B, T)
        "attention_mask": dict(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long)),
        "pixel_values": dict(input_ids=ids, pixel_values=torch.randn(1, 1, v.image_size, v.image_size)),
        "input_features": dict(input_ids=ids, input_features=torch.randn(1, a.num_mel_bins + 1, 3000)),
    }
    for name, kwargs in cases.items():
        with pytest.raises(ConfigError, match=name) as e:
            model(**kwargs)
        assert str(tuple(kwargs[name].shape)) in str(e.value) or "x".join(
            map(str, kwargs[name].shape)
        ) in str(e.value)
    with pytest.raises(ConfigError, match="input_ids"):
        model(input_ids=ids.float())
    with pytest.raises(ConfigError, match="pixel_values"):
        model(input_ids=ids, pixel_values=good_pixels.to(torch.int64))
