"""Audio decoding (formats, budgets, bad files), resampling and the windowing audio processor."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from omnilm.config import AudioConfig
from omnilm.errors import MediaError
from omnilm.processing.audio import AudioProcessor, load_audio, resample, supported_formats


def tone(freq, seconds, rate, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(x, rate, fmt="WAV", subtype="PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def spectrum_db(x, rate):
    """Magnitude spectrum in dB relative to its peak, with the peak's frequency."""
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1 / rate)
    return freqs, 20 * np.log10(spec / spec.max() + 1e-20)


# ---- resampling -------------------------------------------------------------------------------------------


def test_resampler_keeps_frequency_and_rejects_aliases():
    x = tone(1000, 1.0, 44100) + tone(11000, 1.0, 44100, amp=0.3)  # 11 kHz is above 16 kHz's Nyquist (8 kHz)
    y = resample(x, 44100, 16000)
    assert y.dtype == np.float32 and abs(y.size - 16000) <= 1
    freqs, db = spectrum_db(y[1000:-1000], 16000)
    assert abs(freqs[np.argmax(db)] - 1000) < 5  # the tone stays at 1 kHz
    # naive decimation would fold 11 kHz to 16 - 11 = 5 kHz at -10 dB; the band-limited filter removes it
    alias = db[(freqs > 4900) & (freqs < 5100)].max()
    assert alias < -60
    away = db[(np.abs(freqs - 1000) > 50)].max()
    assert away < -60


def test_resample_identity_and_upsampling():
    x = tone(440, 0.5, 16000)
    assert np.array_equal(resample(x, 16000, 16000), x)
    y = resample(tone(440, 0.5, 8000), 8000, 16000)
    freqs, db = spectrum_db(y[500:-500], 16000)
    assert y.size == 8000 and abs(freqs[np.argmax(db)] - 440) < 5


# ---- decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]
)
def test_load_formats_and_stereo_mixdown(tmp_path, fmt, subtype):
    left, right = tone(440, 1.0, 22050), tone(880, 1.0, 22050, amp=0.25)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, np.stack([left, right], axis=1), 22050, format=fmt, subtype=subtype)
    y = load_audio(path, target_rate=16000)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(y.size - 16000) <= 1
    expected = resample((left + right) / 2, 22050, 16000)
    tol = 0.05 if fmt == "OGG" else 1e-3  # Vorbis is lossy
    assert np.sqrt(np.mean((y[200:-200] - expected[200:-200]) ** 2)) < tol


def test_load_mp3_or_clear_error(tmp_path):
    path = tmp_path / "clip.mp3"
    if "MP3" in supported_formats():
        sf.write(path, tone(440, 1.0, 16000), 16000, format="MP3", subtype="MPEG_LAYER_III")
        y = load_audio(path)
        freqs, db = spectrum_db(y, 16000)
        assert abs(freqs[np.argmax(db)] - 440) < 5
    else:
        path.write_bytes(b"\xff\xfb\x90\x00" + bytes(1000))
        with pytest.raises(MediaError, match="MP3"):
            load_audio(path)


def test_bytes_and_file_objects():
    data = encode(tone(300, 0.5, 16000), 16000)
    assert load_audio(data).size == 8000
    assert load_audio(io.BytesIO(data)).size == 8000


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_truncated_audio_is_media_error(tmp_path, fmt, subtype):
    data = encode(tone(440, 2.0, 16000), 16000, fmt, subtype)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut"):
        load_audio(path)


def test_corrupt_empty_and_missing_files(tmp_path):
    cases = {
        "empty.wav": b"",
        "text.wav": b"this is not audio at all\n" * 20,
        "header.wav": encode(tone(440, 1.0, 16000), 16000)[:40],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError, match=name):
            load_audio(tmp_path / name)
    with pytest.raises(MediaError, match="no such"):
        load_audio(tmp_path / "missing.wav")
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, np.float32), 16000)
    with pytest.raises(MediaError, match="zero.wav"):
        load_audio(zero)


def test_budgets_checked_from_header(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(path, tone(440, 3.0, 8000), 8000)
    read_calls = []
    monkeypatch.setattr(sf, "read", lambda *a, **k: read_calls.append(1))
    with pytest.raises(MediaError, match="3.0 s .* limit of 2 s"):
        load_audio(path, max_seconds=2.0)
    with pytest.raises(MediaError, match="limit of 1000 bytes"):
        load_audio(path, max_bytes=1000)
    assert not read_calls  # refused before any sample was decoded


# ---- processor --------------------------------------------------------------------------------------------


def test_whisper_processor_from_preprocessor_config(tmp_path):
    WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path)
    proc = AudioProcessor.from_pretrained(tmp_path)
    assert (proc.kind, proc.num_mel_bins, proc.window_seconds, proc.tokens_per_window) == (
        "whisper",
        80,
        30.0,
        375,
    )
    rng = np.random.default_rng(0)
    clip = (tone(220, 12.0, 16000) + 0.05 * rng.standard_normal(12 * 16000)).astype(np.float32)
    out = proc([clip])
    ref = WhisperFeatureExtractor(feature_size=80)([clip], sampling_rate=16000, return_tensors="np")[
        "input_features"
    ]
    assert out["windows_per_clip"] == [1]
    assert np.abs(out["input_features"].numpy() - ref).max() <= 1e-4
    assert json.loads(json.dumps(proc.to_dict()))["feature_extractor_type"] == "WhisperFeatureExtractor"


def test_long_audio_is_cut_into_ordered_windows(tmp_path):
    proc = AudioProcessor(kind="whisper", window_seconds=2.0, tokens_per_window=25)
    a, b = tone(300, 5.0, 16000), tone(1200, 1.0, 16000)  # 3 windows, then 1
    path = tmp_path / "a.wav"
    sf.write(path, a, 16000, subtype="FLOAT")
    out = proc([path, b])
    assert out["windows_per_clip"] == [3, 1] and out["input_features"].shape == (4, 80, 200)
    assert proc.num_tokens(out["windows_per_clip"]) == [75, 25]
    for row, piece in zip(out["input_features"], [a[:32000], a[32000:64000], a[64000:], b]):
        assert torch.allclose(row, proc([piece])["input_features"][0], atol=1e-5)


def test_wav2vec2_processor_normalizes_and_pads():
    cfg = AudioConfig(kind="wav2vec2", window_seconds=1.0)
    proc = AudioProcessor.from_dict(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": True, "sampling_rate": 16000},
        audio_config=cfg,
    )
    assert proc.tokens_per_window == cfg.tokens_per_window == 12
    out = proc(tone(500, 1.5, 32000) + 0.2, sampling_rate=32000)  # resampled, offset removed
    feats = out["input_features"]
    assert out["windows_per_clip"] == [2] and feats.shape == (2, 16000)
    assert abs(float(feats[0].mean())) < 1e-3 and abs(float(feats[0].std()) - 1) < 1e-2
    assert torch.all(feats[1, 8000:] == 0) and float(feats[1, :8000].std()) > 0.5


def test_processor_rejects_mismatched_model():
    with pytest.raises(Exception, match="mel bins"):
        AudioProcessor.from_dict(
            {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128},
            audio_config=AudioConfig(num_mel_bins=80),
        )
