"""Audio decoding and the Whisper / wav2vec2 audio processor.

`load_audio` is the one door for untrusted audio bytes: the byte budget is checked from the file size
and the duration budget from the header, both before any sample is decoded. Decoding goes through
libsndfile (soundfile): WAV, FLAC, OGG, and MP3 where the installed libsndfile has it. Clips are mixed
down to mono and resampled with a polyphase band-limited filter (scipy's resample_poly).

`AudioProcessor` cuts a clip into fixed windows (30 s for Whisper) so every window becomes the same
number of decoder tokens, and reports how many windows each clip gave so the prompt gets one run of
placeholders per window, in order.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ..config import AudioConfig
from ..errors import ConfigError, MediaError

MAX_BYTES = 256 * 1024**2  # 256 MiB of encoded audio (~25 min of 16-bit stereo 44.1 kHz WAV)
MAX_SECONDS = 600.0  # 10 min: 20 Whisper windows, 7500 decoder tokens at 375 per window
MAX_SAMPLE_RATE = 768_000  # the highest rate real hardware records; headers can claim 2^31-1
MIN_SAMPLE_RATE = 1_000
MAX_CHANNELS = 64
MAX_DECODED_BYTES = 1024**3  # float32 frames x channels before the mixdown
MAX_RESAMPLE_FACTOR = 1000  # bounds the polyphase filter's length and cost
_MPEG_FRAME = 1152  # samples per MPEG-1 Layer III frame; the header's length of an MP3 is only this exact


def supported_formats() -> list[str]:
    formats = ["WAV", "FLAC", "OGG"]
    if "MP3" in sf.available_formats():  # libsndfile >= 1.1 built with mpg123/lame
        formats.append("MP3")
    return formats


def load_audio(
    src, target_rate: int = 16000, max_bytes: int = MAX_BYTES, max_seconds: float = MAX_SECONDS
) -> np.ndarray:
    """Decode a path, bytes or binary file object into a mono float32 waveform at target_rate.

    Raises MediaError naming the file for a missing, oversized, over-long, empty, truncated or
    non-audio input.
    """
    name, data = _read_bytes(src, max_bytes)
    if not data:
        raise MediaError(f"{name}: empty file (0 bytes), not audio")
    fmt_hint = Path(name).suffix.lstrip(".").upper()
    if fmt_hint == "MP3" and "MP3" not in supported_formats():
        raise MediaError(
            f"{name}: MP3 is not supported by the installed libsndfile "
            f"{sf.__libsndfile_version__}; supported: {', '.join(supported_formats())}"
        )
    try:
        with _quiet_stderr(data):
            info = sf.info(io.BytesIO(data))  # header only
    except (sf.LibsndfileError, RuntimeError, ValueError, OverflowError) as e:
        raise MediaError(
            f"{name}: not a decodable audio file (expected {', '.join(supported_formats())}): {_reason(e)}"
        ) from None
    if info.format not in ("WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3"):
        raise MediaError(
            f"{name}: audio format {info.format} is not accepted (expected {', '.join(supported_formats())})"
        )
    if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        raise MediaError(f"{name}: empty audio (no samples)")
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise MediaError(
            f"{name}: sample rate {info.samplerate} Hz in the header is outside "
            f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz"
        )
    if info.channels > MAX_CHANNELS:
        raise MediaError(
            f"{name}: {info.channels} channels in the header exceeds the limit of {MAX_CHANNELS}"
        )
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise MediaError(f"{name}: {seconds:.1f} s of audio exceeds the limit of {max_seconds:g} s")
    decoded = info.frames * info.channels * 4
    if decoded > MAX_DECODED_BYTES:
        raise MediaError(
            f"{name}: {info.frames} frames x {info.channels} channels would decode to {decoded} bytes, "
            f"over the limit of {MAX_DECODED_BYTES} bytes"
        )
    if info.format in ("WAV", "WAVEX"):
        _check_wav_complete(name, data)
    slack = 2 * _MPEG_FRAME if info.format == "MP3" else 0
    try:
        # frames capped at the header's count: a header that under-reports cannot grow the decode
        with _quiet_stderr(data):
            wav, rate = sf.read(io.BytesIO(data), frames=info.frames + slack, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise MediaError(f"{name}: audio data is truncated or corrupt: {_reason(e)}") from None
    if wav.shape[0] == 0 or wav.shape[0] < info.frames - slack:
        raise MediaError(
            f"{name}: audio data is truncated: the header promises {info.frames} frames, "
            f"the file holds {wav.shape[0]}"
        )
    if not np.isfinite(wav).all():
        raise MediaError(f"{name}: audio holds NaN or infinite samples")
    mono = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    return resample(mono, rate, target_rate)


@contextlib.contextmanager
def _quiet_stderr(data: bytes):
    """libmpg123 prints its complaints about a bad MP3 straight to file descriptor 2, ahead of the one
    `error:` line; silence that descriptor while MPEG data is decoded (the MediaError says what failed)."""
    mpeg = data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if not mpeg:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def resample(wav: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed FIR at the lower Nyquist rate)."""
    if rate == target_rate:
        return np.ascontiguousarray(wav, dtype=np.float32)
    from scipy.signal import resample_poly  # imported here: scipy.signal costs ~1 s of CPU to import

    g = math.gcd(int(rate), int(target_rate))
    up, down = target_rate // g, rate // g
    if max(up, down) > MAX_RESAMPLE_FACTOR:
        # an odd rate (e.g. 44101 Hz) gives a filter of ~20 x max(up, down) taps and as many MACs per
        # sample; the nearest ratio with small terms is off by < 1e-6 of the pitch
        ratio = Fraction(up, down).limit_denominator(MAX_RESAMPLE_FACTOR)
        up, down = ratio.numerator, ratio.denominator
    out = resample_poly(wav.astype(np.float64), up, down)
    return out.astype(np.float32)


def _reason(e: Exception) -> str:
    # libsndfile's messages start with "Error opening <_io.BytesIO object at 0x..>: "; keep the reason only
    msg = str(e)
    return msg.split(": ", 1)[1] if msg.startswith("Error") and ": " in msg else msg


def _read_bytes(src, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > max_bytes:
            raise MediaError(f"<bytes>: {len(data)} bytes of audio exceeds the limit of {max_bytes} bytes")
        return "<bytes>", data
    if hasattr(src, "read"):
        name = str(getattr(src, "name", "<file>"))
        data = src.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise MediaError(f"{name}: audio exceeds the limit of {max_bytes} bytes")
        return name, data
    path = Path(src)
    if not path.is_file():
        raise MediaError(f"{path}: no such audio file")
    size = path.stat().st_size
    if size > max_bytes:
        raise MediaError(f"{path}: {size} bytes of audio exceeds the limit of {max_bytes} bytes")
    return str(path), path.read_bytes()


def _check_wav_complete(name: str, data: bytes):
    """libsndfile quietly shortens a WAV whose data chunk is cut off; a cut file is an error here."""
    pos = 12  # after "RIFF" <size> "WAVE"
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            if size in (
                0,
                0xFFFFFFFF,
            ):  # streamed WAV (length unknown when written) or RF64-style: trust libsndfile
                return
            if pos + 8 + size > len(data):
                raise MediaError(
                    f"{name}: audio data is truncated: the WAV header promises {size} bytes of samples, "
                    f"the file holds {len(data) - pos - 8}"
                )
            return
        pos += 8 + size + (size & 1)  # chunks are padded to even length


@dataclass
class AudioProcessor:
    """preprocessor_config.json's WhisperFeatureExtractor / Wav2Vec2FeatureExtractor -> input_features.

    Whisper: each window becomes log-mel (n_mels, 3000); wav2vec2: each window is the raw waveform
    (samples_per_window,), zero-mean unit-variance over its real samples when do_normalize, then
    zero-padded. `tokens_per_window` is what the encoder plus projector make of one window.
    """

    kind: str = "whisper"  # "whisper" | "wav2vec2"
    sampling_rate: int = 16000
    window_seconds: float = 30.0  # Whisper's chunk_length
    num_mel_bins: int = 80
    n_fft: int = 400
    hop_length: int = 160
    do_normalize: bool = False  # wav2vec2 only
    tokens_per_window: int | None = None  # None: derived for a standard encoder and a 4-frame projector
    max_bytes: int = MAX_BYTES
    max_seconds: float = MAX_SECONDS

    def __post_init__(self):
        if self.kind not in ("whisper", "wav2vec2"):
            raise ConfigError(f"audio processor kind must be 'whisper' or 'wav2vec2', got {self.kind!r}")
        if self.tokens_per_window is None:
            self.tokens_per_window = AudioConfig(
                kind=self.kind,
                num_mel_bins=self.num_mel_bins,
                hop_length=self.hop_length,
                n_fft=self.n_fft,
                sampling_rate=self.sampling_rate,
                window_seconds=self.window_seconds,
            ).tokens_per_window
        self._logmel = None

    @property
    def samples_per_window(self) -> int:
        return int(round(self.window_seconds * self.sampling_rate))

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, audio_config: AudioConfig | None = None) -> AudioProcessor:
        kind_name = str(d.get("feature_extractor_type", ""))
        if "Whisper" in kind_name or (not kind_name and "n_fft" in d):
            kw = dict(
                kind="whisper",
                sampling_rate=d.get("sampling_rate", 16000),
                window_seconds=float(d.get("chunk_length", 30)),
                num_mel_bins=d.get("feature_size", 80),
                n_fft=d.get("n_fft", 400),
                hop_length=d.get("hop_length", 160),
            )
        elif "Wav2Vec2" in kind_name:
            kw = dict(
                kind="wav2vec2",
                sampling_rate=d.get("sampling_rate", 16000),
                do_normalize=bool(d.get("do_normalize", True)),
            )
        else:
            raise ConfigError(
                f"preprocessor_config.json: feature_extractor_type {kind_name!r} is not an audio "
                "feature extractor OmniLM reads (expected WhisperFeatureExtractor or Wav2Vec2FeatureExtractor)"
            )
        if audio_config is not None:
            if audio_config.kind != kw["kind"] or audio_config.sampling_rate != kw["sampling_rate"]:
                raise ConfigError(
                    f"preprocessor_config.json describes a {kw['kind']} front end at {kw['sampling_rate']} Hz, "
                    f"but the model's audio encoder is {audio_config.kind} at {audio_config.sampling_rate} Hz"
                )
            if kw["kind"] == "whisper" and audio_config.num_mel_bins != kw["num_mel_bins"]:
                raise ConfigError(
                    f"preprocessor_config.json: feature_size {kw['num_mel_bins']} but the model's Whisper "
                    f"encoder takes {audio_config.num_mel_bins} mel bins"
                )
            kw.update(
                window_seconds=audio_config.window_seconds, tokens_per_window=audio_config.tokens_per_window
            )
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path, audio_config: AudioConfig | None = None) -> AudioProcessor:
        f = Path(path) / "preprocessor_config.json" if Path(path).is_dir() else Path(path)
        if not f.is_file():
            raise ConfigError(f"{f}: no preprocessor_config.json")
        from ..convert.validate import read_json

        return cls.from_dict(read_json(f, error=ConfigError), audio_config)

    @classmethod
    def from_config(cls, cfg: AudioConfig) -> AudioProcessor:
        return cls(
            kind=cfg.kind,
            sampling_rate=cfg.sampling_rate,
            window_seconds=cfg.window_seconds,
            num_mel_bins=cfg.num_mel_bins,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            do_normalize=cfg.kind == "wav2vec2",
            tokens_per_window=cfg.tokens_per_window,
        )

    def to_dict(self) -> dict:
        """The preprocessor_config.json fields transformers reads back."""
        if self.kind == "whisper":
            n_samples = self.samples_per_window
            return {
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": self.num_mel_bins,
                "sampling_rate": self.sampling_rate,
                "hop_length": self.hop_length,
                "chunk_length": int(self.window_seconds),
                "n_fft": self.n_fft,
                "n_samples": n_samples,
                "nb_max_frames": n_samples // self.hop_length,
                "padding_side": "right",
                "padding_value": 0.0,
                "return_attention_mask": False,
            }
        return {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1,
            "sampling_rate": self.sampling_rate,
            "do_normalize": self.do_normalize,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": False,
        }

    # ---- processing --------------------------------------------------------------------------------

    def load(self, clip, sampling_rate: int | None = None) -> np.ndarray:
        """A path, bytes or file object (decoded with the budgets), or a waveform array at sampling_rate."""
        if isinstance(clip, (torch.Tensor, np.ndarray)):
            wav = clip.detach().cpu().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip)
            if wav.ndim == 2:  # (channels, samples)
                wav = wav.mean(axis=0)
            if wav.ndim != 1 or wav.size == 0:
                raise MediaError(
                    f"audio array must be a non-empty waveform (samples,) or (channels, samples), "
                    f"got shape {wav.shape}"
                )
            rate = sampling_rate or self.sampling_rate
            if wav.size / rate > self.max_seconds:
                raise MediaError(
                    f"audio array: {wav.size / rate:.1f} s exceeds the limit of {self.max_seconds:g} s"
                )
            return resample(wav.astype(np.float32), rate, self.sampling_rate)
        return load_audio(clip, self.sampling_rate, self.max_bytes, self.max_seconds)

    def num_windows(self, n_samples: int) -> int:
        return max(1, math.ceil(n_samples / self.samples_per_window))

    def windows(self, wav: np.ndarray) -> list[np.ndarray]:
        """Consecutive, non-overlapping windows of one clip; the last one is short (padded later)."""
        n = self.samples_per_window
        return [wav[i * n : (i + 1) * n] for i in range(self.num_windows(wav.shape[0]))]

    def __call__(self, audio, sampling_rate: int | None = None, device=None) -> dict:
        """audio: one or a list of clips -> {"input_features": (N_windows, ...) float32, "windows_per_clip": [..]}.

        Rows are the clips' windows in order (clip 0's windows first). Whisper rows are log-mel
        (n_mels, 3000), computed on `device` (CPU by default); wav2vec2 rows are waveforms.
        """
        if not isinstance(audio, (list, tuple)):
            audio = [audio]
        rows, counts = [], []
        for clip in audio:
            wins = self.windows(self.load(clip, sampling_rate))
            rows.extend(wins)
            counts.append(len(wins))
        if not rows:
            return {"input_features": None, "windows_per_clip": []}
        if self.kind == "whisper":
            features = self._whisper_features(rows, device)
        else:
            features = torch.from_numpy(np.stack([self._wav2vec2_row(w) for w in rows]))
        return {"input_features": features, "windows_per_clip": counts}

    def num_tokens(self, windows_per_clip: list[int]) -> list[int]:
        """Placeholder tokens per clip: one run of tokens_per_window for each window."""
        return [n * self.tokens_per_window for n in windows_per_clip]

    def _whisper_features(self, rows, device) -> torch.Tensor:
        from ..models.audio.logmel import LogMel

        if self._logmel is None:
            self._logmel = LogMel(
                self.num_mel_bins, self.n_fft, self.hop_length, self.sampling_rate, self.window_seconds
            )
        logmel = self._logmel.to(device or "cpu")
        n = self.samples_per_window
        batch = np.zeros((len(rows), n), dtype=np.float32)  # zero padding, as WhisperFeatureExtractor pads
        for i, w in enumerate(rows):
            batch[i, : w.shape[0]] = w
        with torch.no_grad():
            return logmel(torch.from_numpy(batch).to(logmel.window.device))

    def _wav2vec2_row(self, w: np.ndarray) -> np.ndarray:
        w = w.astype(np.float32)
        if self.do_normalize:  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, over the real samples only
            w = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
        out = np.zeros(self.samples_per_window, dtype=np.float32)
        out[: w.shape[0]] = w
        return out
