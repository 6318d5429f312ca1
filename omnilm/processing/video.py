"""Video in: frames sampled at a fixed rate and the sound track, as an ordered list of parts.

`load_video(path_or_bytes, fps=1.0, max_frames=32)` returns parts in time order:

    [("text", "<t=0.0s>"), ("image", <PIL frame>), ("audio", <WAV bytes, 0-1 s>),
     ("text", "<t=1.0s>"), ("image", <PIL frame>), ("audio", <WAV bytes, 1-2 s>), ...]

Each frame goes to the image processor (its own placeholder run) after a timestamp text; the sound
track is cut into chunks of `audio_chunk_seconds` (the audio encoder's window when called through the
Processor), each placed at its start time, after the frame shown at that moment. Audio chunks are
16-bit WAV bytes so the audio processor reads their rate from the data, not from the caller.

Duration, resolution, frame rate and stream count are checked from the container header before any
frame is decoded; decoded frames are checked again (a header can lie). Every failure is a MediaError
naming the file. PyAV bundles FFmpeg, so MP4/MOV, WebM/MKV and AVI all read the same way.
"""

from __future__ import annotations

import io
import math

import numpy as np

from ..errors import MediaError

DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 32
MAX_VIDEO_BYTES = 256 * 1024 * 1024
MAX_VIDEO_SECONDS = 3 * 3600.0
MAX_FRAME_PIXELS = 4096 * 4096
MAX_SOUND_SECONDS = 600.0  # decoded into memory (38 MB at 16 kHz) and all of it becomes audio tokens
MAX_STREAMS = 16
MAX_STREAM_FPS = 1000.0  # containers claiming more are broken or hostile
MAX_SAMPLE_FPS = 30.0  # the rate we sample at; more than the source rate is pointless anyway
MAX_DECODED_FRAMES = 20_000  # frames decoded between two sampled ones (seeking skips long gaps)
SEEK_GAP_SECONDS = 2.0


def video_container(head: bytes) -> bool:
    """True for the magic bytes of MP4/MOV (ISO BMFF boxes), Matroska/WebM (EBML) and AVI."""
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
        or head[:4] == b"\x1a\x45\xdf\xa3"
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
    )


def check_video_options(fps: float, max_frames: int) -> None:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= MAX_SAMPLE_FPS):
        raise MediaError(f"video frame rate {fps!r}: expected a number in (0, {MAX_SAMPLE_FPS:g}] frames/s")
    if not (isinstance(max_frames, int) and 1 <= max_frames <= 4096):
        raise MediaError(f"max_video_frames {max_frames!r}: expected an integer in 1..4096")


def load_video(
    source,
    *,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    audio_chunk_seconds: float = 30.0,
    audio_rate: int = 16000,
    max_bytes: int = MAX_VIDEO_BYTES,
    max_seconds: float = MAX_VIDEO_SECONDS,
    max_pixels: int = MAX_FRAME_PIXELS,
    data: bytes | None = None,
    name: str | None = None,
) -> list[tuple[str, object]]:
    """Parts [("text", "<t=..s>"), ("image", PIL.Image), ("audio", WAV bytes), ...] in time order."""
    check_video_options(fps, max_frames)
    if data is None:
        from .textio import read_limited

        data, name = read_limited(source, max_bytes, "video")
    name = name or "<video bytes>"
    try:
        return _load(data, name, fps, max_frames, audio_chunk_seconds, audio_rate, max_seconds, max_pixels)
    except MediaError:
        raise
    except Exception as e:  # PyAV raises its own FFmpegError family and sometimes plain errors
        raise MediaError(f"{name}: corrupt or unreadable video ({type(e).__name__}: {e})") from None


def _open(data: bytes):
    import av

    # metadata_errors="ignore": broken tag encodings are not worth refusing a clip for
    return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")


def _load(data, name, fps, max_frames, chunk_seconds, audio_rate, max_seconds, max_pixels):
    with _open(data) as container:
        duration, has_audio = _check_header(container, name, max_seconds, max_pixels)
        if has_audio and duration > MAX_SOUND_SECONDS:
            raise MediaError(
                f"{name}: {duration:.1f} s with a sound track is over the {MAX_SOUND_SECONDS:g}-second limit "
                "for sound (every second of it becomes audio tokens)"
            )
        times = sample_times(duration, fps, max_frames)
        frames = _frames(container, name, times, max_pixels)
    if not frames:
        raise MediaError(f"{name}: the video stream has no decodable frames")
    chunks = []
    if has_audio:
        with _open(data) as container:
            wav = _sound_track(container, name, audio_rate, min(max_seconds, MAX_SOUND_SECONDS))
        # encoders pad the end (AAC: up to a frame of 1024 samples); the clip ends where the header says
        chunks = _chunks(wav[: int(math.ceil(duration * audio_rate))], audio_rate, chunk_seconds)

    # (time, 0 for a frame | 1 for audio, parts): at equal times the frame comes first
    events = [(t, 0, [("text", timestamp_text(t)), ("image", img)]) for t, img in frames]
    events += [(t, 1, [("audio", wav_bytes)]) for t, wav_bytes in chunks]
    events.sort(key=lambda e: (e[0], e[1]))
    return [part for _, _, parts in events for part in parts]


def timestamp_text(seconds: float) -> str:
    return f"<t={seconds:.1f}s>"


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Frame times k / fps inside the clip; when more than max_frames would fall in it, max_frames
    evenly spaced over the whole clip instead (the end of a long video is not dropped)."""
    n = max(1, math.ceil(duration * fps - 1e-9))
    if n <= max_frames:
        return [k / fps for k in range(n)]
    return [k * duration / max_frames for k in range(max_frames)]


def _check_header(container, name, max_seconds, max_pixels) -> tuple[float, bool]:
    """(duration in seconds, has a sound track) from the header alone; refuses what cannot be read."""
    streams = container.streams
    if len(streams) > MAX_STREAMS:
        raise MediaError(f"{name}: {len(streams)} streams is over the limit of {MAX_STREAMS}")
    if not streams.video:
        kinds = ", ".join(sorted({s.type for s in streams})) or "none"
        raise MediaError(f"{name}: no video stream (streams: {kinds})")
    v = streams.video[0]
    w, h = v.codec_context.width, v.codec_context.height
    if w <= 0 or h <= 0:
        raise MediaError(f"{name}: video stream has no frame size in its header ({w}x{h})")
    if w * h > max_pixels:
        raise MediaError(f"{name}: frames are {w}x{h}, over the {max_pixels}-pixel limit")
    rate = v.average_rate or v.guessed_rate or v.base_rate
    if rate is not None and (not math.isfinite(float(rate)) or not 0 < float(rate) <= MAX_STREAM_FPS):
        raise MediaError(f"{name}: absurd frame rate {float(rate):g} frames/s in the header")
    duration = _duration(container, v)
    if duration is None or not math.isfinite(duration) or duration <= 0:
        raise MediaError(f"{name}: the header gives no usable duration (truncated or streamed file?)")
    if duration > max_seconds:
        raise MediaError(f"{name}: {duration:.1f} s is over the {max_seconds:g}-second limit")
    if v.frames and rate and v.frames > (duration + 1) * float(rate) * 2 + 10:
        raise MediaError(
            f"{name}: header frame count {v.frames} does not fit {duration:.1f} s at {float(rate):g} frames/s"
        )
    return duration, bool(streams.audio)


def _duration(container, v) -> float | None:
    if v.duration is not None and v.time_base is not None:
        return float(v.duration * v.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _frames(container, name, times, max_pixels):
    """[(time, PIL image)]: for each sampled time, the frame on screen then (the last one shown at or
    before it; the first frame for times before it)."""
    v = container.streams.video[0]
    v.thread_type = "AUTO"
    start = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
    out, it, decoded = [], None, 0
    shown = ahead = None  # (time, frame): the frame on screen, and one decoded past the last target
    for t in times:
        if ahead is not None and ahead[0] - 1e-3 <= t:
            shown, ahead = ahead, None
        if it is None or (shown is not None and t - shown[0] > SEEK_GAP_SECONDS and ahead is None):
            if it is not None:
                container.seek(int((t + start) / v.time_base), stream=v, backward=True, any_frame=False)
            it = container.decode(v)
        while ahead is None:
            frame = next(it, None)
            if frame is None:
                break
            decoded += 1
            if decoded > MAX_DECODED_FRAMES + len(times):
                raise MediaError(f"{name}: over {MAX_DECODED_FRAMES} frames decoded before t={t:.1f}s")
            if frame.width * frame.height > max_pixels:
                raise MediaError(
                    f"{name}: a decoded frame is {frame.width}x{frame.height}, over the pixel limit"
                )
            item = ((frame.time if frame.time is not None else 0.0) - start, frame)
            if item[0] - 1e-3 <= t or shown is None:
                shown = item
            else:
                ahead = item
        if shown is None:
            break
        if ahead is None and out and shown[1] is out[-1][2]:
            break  # the stream ended before this time (the header overstated the duration)
        out.append((t, shown[1].to_image(), shown[1]))
    return [(t, img) for t, img, _ in out]


def _sound_track(container, name, rate, max_seconds) -> np.ndarray:
    """The first audio stream, mono float32 at `rate` (FFmpeg's resampler), at most max_seconds."""
    import av

    a = container.streams.audio[0]
    if a.codec_context.sample_rate is not None and not 0 < a.codec_context.sample_rate <= 768_000:
        raise MediaError(f"{name}: absurd audio sample rate {a.codec_context.sample_rate}")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    limit = int(max_seconds * rate)
    pieces, total, first = [], 0, None
    for frame in container.decode(a):
        if first is None and frame.time is not None:
            first = frame.time
            start = float(a.start_time * a.time_base) if a.start_time is not None else 0.0
            if first - start > 0:  # sound starting late: silence until it does
                lead = np.zeros(min(limit, int((first - start) * rate)), np.float32)
                pieces.append(lead)
                total += lead.size
        for out in resampler.resample(frame):
            pieces.append(out.to_ndarray().reshape(-1))
            total += pieces[-1].size
        if total > limit:
            raise MediaError(f"{name}: the sound track is longer than {max_seconds:g} s")
    for out in resampler.resample(None):  # flush
        pieces.append(out.to_ndarray().reshape(-1))
    wav = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if not np.isfinite(wav).all():
        raise MediaError(f"{name}: the sound track decodes to non-finite samples")
    return wav


def _chunks(wav: np.ndarray, rate: int, seconds: float) -> list[tuple[float, bytes]]:
    """[(start time, 16-bit WAV bytes)] of consecutive chunks; a tail under 10 ms is dropped."""
    import soundfile

    n = max(1, int(round(seconds * rate)))
    out = []
    for i in range(0, len(wav), n):
        piece = wav[i : i + n]
        if len(piece) < rate // 100:
            break
        buf = io.BytesIO()
        soundfile.write(buf, np.clip(piece, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
        out.append((i / rate, buf.getvalue()))
    return out


# ---- writing (tests and the demo make their clips with the same library) ------------------------------


def write_video(
    frames,
    fps: float = 1.0,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    codec: str = "libx264",
    container: str = "mp4",
) -> bytes:
    """Bytes of a video holding PIL frames shown at `fps`, with an optional mono float sound track."""
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        rate = Fraction(fps).limit_denominator(1000)
        vs = out.add_stream(codec, rate=rate)
        vs.width, vs.height = frames[0].size
        vs.pix_fmt = "yuv420p"
        if codec == "libx264":
            vs.options = {"preset": "ultrafast", "crf": "18"}
        aus = None
        if audio is not None:
            aus = out.add_stream("aac", rate=audio_rate, layout="mono")
        for img in frames:
            for packet in vs.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if aus is not None:
            samples = np.asarray(audio, np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate = audio_rate
            for packet in aus.encode(frame):
                out.mux(packet)
            for packet in aus.encode():
                out.mux(packet)
    return buf.getvalue()
