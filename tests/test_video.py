"""Video files: frames at the configured rate with timestamps, the sound track interleaved by time, the
placeholders a tiny model fills, the CLI, and malformed containers refused as MediaError."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from omnilm.errors import MediaError
from omnilm.processing.documents import load_document, sniff_kind
from omnilm.processing.video import load_video, sample_times, write_video

RATE = 16000
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 240, 20)]
TONES = [440.0, 880.0, 1320.0, 660.0]


def _frames(n=4, size=16):
    return [Image.new("RGB", (size, size), COLOURS[i % 4]) for i in range(n)]


def _tones(seconds):
    t = np.arange(int(seconds * RATE)) / RATE
    f = np.array(TONES)[np.minimum(t.astype(int), len(TONES) - 1)]
    return (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def _dominant(wav):
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return np.fft.rfftfreq(len(wav), 1 / RATE)[spec.argmax()]


@pytest.fixture(scope="module")
def clips():
    return {
        "sound": write_video(_frames(4), fps=1.0, audio=_tones(4.0)),
        "silent": write_video(_frames(4), fps=1.0),
        "webm": write_video(_frames(4), fps=2.0, codec="libvpx", container="webm"),
    }


def _close(img, colour, tol=30):
    return np.abs(np.asarray(img, np.float32).mean((0, 1)) - colour).max() < tol


def test_frames_and_sound_interleave_by_time(clips):
    assert sniff_kind(clips["sound"], "clip.bin") == "video"
    parts = load_video(clips["sound"], audio_chunk_seconds=1.0)
    assert [k for k, _ in parts] == ["text", "image", "audio"] * 4
    for i in range(4):
        stamp, img, wav = (v for _, v in parts[3 * i : 3 * i + 3])
        assert stamp == f"<t={float(i):.1f}s>"
        assert _close(img, COLOURS[i])
        samples, rate = soundfile.read(io.BytesIO(wav))
        assert rate == RATE and abs(len(samples) - RATE) <= 1
        # AAC is lossy, but each second keeps its own tone
        assert abs(_dominant(samples[2000:-2000]) - TONES[i]) < 20


def test_without_sound_rate_and_frame_cap(clips):
    parts = load_document(clips["silent"])
    assert [k for k, _ in parts] == ["text", "image"] * 4
    parts = load_video(clips["webm"], fps=2.0)  # 4 frames at 2/s: 2 s
    stamps = [v for k, v in parts if k == "text"]
    assert stamps == [f"<t={t / 2:.1f}s>" for t in range(4)]
    # more frames than allowed: spread over the whole clip instead of cutting its end
    parts = load_video(clips["webm"], fps=2.0, max_frames=3)
    images = [v for k, v in parts if k == "image"]
    assert len(images) == 3 and [_close(im, c) for im, c in zip(images, COLOURS[:3])] == [True] * 3
    assert sample_times(10.0, 1.0, 4) == [0.0, 2.5, 5.0, 7.5]
    with pytest.raises(MediaError, match="frame rate"):
        load_video(clips["silent"], fps=1000.0)


def _tiny():
    from omnilm.demo.train import build_model, build_processor, model_config
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    cfg = model_config(tok)
    return build_model(cfg, seed=0).eval(), build_processor(cfg, tok), cfg


def _runs(ids, token_id):
    """[(start, length)] of consecutive token_id runs."""
    out, start = [], None
    for i, t in enumerate(ids + [-1]):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            out.append((start, i - start))
            start = None
    return out


@torch.no_grad()
def test_model_fills_every_frame_and_clip_at_its_placeholders(clips, tmp_path):
    model, processor, cfg = _tiny()
    path = tmp_path / "clip.mp4"
    path.write_bytes(clips["sound"])
    batch = processor(text="which colours?", files=[str(path)])
    ids = batch["input_ids"][0].tolist()
    image_runs, audio_runs = _runs(ids, cfg.image_token_id), _runs(ids, cfg.audio_token_id)
    n_img, n_aud = cfg.vision.tokens_per_image, cfg.audio.tokens_per_window
    assert [n for _, n in image_runs] == [n_img] * 4 and [n for _, n in audio_runs] == [n_aud] * 4
    # frame i, then the sound of second i, each frame after its timestamp text
    assert all(image_runs[i][0] < audio_runs[i][0] < image_runs[i + 1][0] for i in range(3))
    text = processor.tokenizer.decode(ids)
    assert text.index("<t=0.0s>") < text.index("<t=1.0s>") < text.index("<t=3.0s>") < text.index("which")
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["input_features"].shape[0] == 4

    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["input_features"])[0]  # (T, D)
    img_feats = model.image_features(batch["pixel_values"]).reshape(-1, embeds.shape[-1])
    aud_feats = model.audio_features(batch["input_features"]).reshape(-1, embeds.shape[-1])
    for runs, feats, n in ((image_runs, img_feats, n_img), (audio_runs, aud_feats, n_aud)):
        for k, (start, length) in enumerate(runs):
            torch.testing.assert_close(embeds[start : start + length], feats[k * n : (k + 1) * n])
    # frames differ, so their features do: each frame landed in its own run
    assert not torch.allclose(embeds[image_runs[0][0]], embeds[image_runs[1][0]])
    logits = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "input_features")}).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_processor_config_carries_the_video_rate(clips, tmp_path):
    from omnilm.processing.multimodal import load_processor

    _, processor, cfg = _tiny()
    processor.video_fps, processor.max_video_frames = 2.0, 3
    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert (loaded.video_fps, loaded.max_video_frames) == (2.0, 3)
    batch = loaded(text="?", files=[clips["webm"]])
    assert batch["pixel_values"].shape[0] == 3


def test_generate_cli_takes_a_video(clips, tmp_path, capsys):
    from omnilm.cli import main

    path = tmp_path / "clip.mp4"
    path.write_bytes(clips["sound"])
    assert (
        main(["generate", "--model", "demo", "--video", str(path), "--prompt", "?", "--max-new-tokens", "2"])
        == 0
    )
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    assert main(["generate", "--model", "demo", "--video", str(png), "--prompt", "?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "x.png" in err[0] and "video" in err[0]


# ---- malformed videos --------------------------------------------------------------------------------


def malformed_videos() -> dict[str, bytes]:
    """Broken containers: cut short, overwritten, lying headers, missing streams, absurd rates."""
    good = write_video(_frames(3), fps=1.0, audio=_tones(3.0))
    webm = write_video(_frames(3), fps=1.0, codec="libvpx", container="webm")
    avi = write_video(_frames(3), fps=1.0, codec="mpeg4", container="avi")
    rng = np.random.default_rng(0)
    cases = {}
    for src_name, src in (("mp4", good), ("webm", webm), ("avi", avi)):
        for frac in (0.05, 0.3, 0.6, 0.95):
            cases[f"{src_name}_cut_{frac}"] = src[: int(len(src) * frac)]
        for k in range(3):
            noisy = np.frombuffer(src, np.uint8).copy()
            noisy[rng.integers(16, len(src), 64)] = rng.integers(0, 256, 64, dtype=np.uint8)
            cases[f"{src_name}_noise_{k}"] = noisy.tobytes()
        cases[f"{src_name}_zeroed_tail"] = src[:64] + bytes(len(src) - 64)
    cases["ftyp_garbage"] = b"\x00\x00\x00\x18ftypisom" + rng.bytes(4000)
    cases["ebml_garbage"] = b"\x1a\x45\xdf\xa3" + rng.bytes(4000)
    cases["avi_garbage"] = b"RIFF\x00\x10\x00\x00AVI LIST" + rng.bytes(4000)
    cases["ftyp_only"] = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    audio_only = io.BytesIO()
    import av

    with av.open(audio_only, "w", format="mp4") as out:
        s = out.add_stream("aac", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(_tones(1.0).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = RATE
        for p in [*s.encode(frame), *s.encode()]:
            out.mux(p)
    cases["no_video_stream"] = audio_only.getvalue()
    cases["absurd_rate"] = write_video(_frames(2), fps=5000.0, codec="mpeg4")
    # a moov box claiming a huge duration and frame size: patch the mvhd/tkhd fields in place
    lying = bytearray(good)
    i = lying.find(b"tkhd")
    lying[i + 80 : i + 88] = (60000 << 16).to_bytes(4, "big") * 2
    cases["tkhd_huge_size"] = bytes(lying)
    lying = bytearray(good)
    i = lying.find(b"mvhd")
    lying[i + 20 : i + 24] = (2**31 - 1).to_bytes(4, "big")
    cases["mvhd_huge_duration"] = bytes(lying)
    cases["moov_swapped"] = good.replace(b"moov", b"moox")
    cases["mdat_swapped"] = good.replace(b"mdat", b"mdax")
    cases["doubled"] = good + good
    return cases


FAST_VIDEO_CASES = ("mp4_cut_0.6", "ftyp_garbage", "no_video_stream", "absurd_rate", "mp4_noise_0")

# One subprocess checks all cases: a crash (segfault in a decoder) fails the test instead of pytest.
CHECKER = textwrap.dedent(
    """
    import json, sys, time
    from omnilm.errors import MediaError
    from omnilm.processing.documents import load_document
    results = {}
    for path in sys.argv[1:]:
        start = time.time()
        try:
            parts = load_document(path, video=dict(audio_chunk_seconds=1.0))
            outcome = "ok:" + ",".join(k for k, _ in parts)[:80]
        except MediaError as e:
            outcome = "error" if path.split("/")[-1] in str(e) else "unnamed:" + str(e)[:200]
        except Exception as e:
            outcome = "crash:" + type(e).__name__ + ": " + str(e)[:200]
        # VmHWM: this process's own peak (ru_maxrss also holds the forking pytest process's peak)
        rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
        results[path] = (outcome, time.time() - start, rss)
    print(json.dumps(results))
    """
)


def check_malformed(cases: dict[str, bytes], tmp_path, suffix: str):
    paths = []
    for name, data in cases.items():
        p = tmp_path / f"{name}{suffix}"
        p.write_bytes(data)
        paths.append(str(p))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHECKER, *paths], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {p: r for p, r in results.items() if not (r[0] == "error" or r[0].startswith("ok:"))}
    assert not bad, bad
    assert max(r[1] for r in results.values()) < 10.0
    assert max(r[2] for r in results.values()) < 1024**3
    return results


def test_malformed_videos_fast_subset(tmp_path):
    cases = malformed_videos()
    results = check_malformed({k: cases[k] for k in FAST_VIDEO_CASES}, tmp_path, ".mp4")
    assert sum(r[0] == "error" for r in results.values()) >= 4


@pytest.mark.slow
def test_malformed_videos_all(tmp_path):
    cases = malformed_videos()
    assert len(cases) >= 30
    check_malformed(cases, tmp_path, ".mp4")


def test_chat_file_part_takes_a_video(clips):
    _, processor, cfg = _tiny()
    messages = [
        {"role": "user", "content": [{"type": "file", "file": clips["sound"]}, {"type": "text", "text": "?"}]}
    ]
    batch = processor(messages=messages)
    ids = batch["input_ids"][0].tolist()
    assert len(_runs(ids, cfg.image_token_id)) == 4 and len(_runs(ids, cfg.audio_token_id)) == 4
    assert batch["pixel_values"].shape[0] == 4 and batch["input_features"].shape[0] == 4
    assert batch["loss_mask"][0][[i for i, t in enumerate(ids) if t == cfg.image_token_id]].sum() == 0
