"""The demo's tasks, built offline: handwritten digits, DTMF tones, generated PDFs, spreadsheets and videos.

Every sample is a prompt (ids with media placeholders already expanded by the real processor), an
answer (ids the model must produce, ending in eos) and its media tensors. Prompts are plain text after
`<|begin_of_text|>` (no chat template), with the media first, exactly what `processor(text=...,
images=..., audio=..., files=...)` builds:

    image -> text   [bos] <image x4> "which digit is this?"   -> "7" [eos]
    audio -> text   [bos] <audio x12> "which number was dialled?" -> "4821" [eos]
    PDF QA          [bos] "Invoice 4821 total 37" <image x4> "\\n\\n" "what is the total?" -> "37" [eos]
    sheet QA        [bos] "Sheet: Invoice\ninvoice | 4821\ntotal | 37" "\n\n" "what is the total?" -> "37" [eos]
    text -> image   [bos] "draw a 7" -> <|image_start|> 16 codes <|image_end|> [eos]
    video QA        [bos] "<t=0.0s>" <image x4> <audio x12> "<t=0.5s>" <image x4> "\n\n"
                    "which digit is shown and which number is dialled?" -> "7 4821" [eos]

A video is a 1 s MP4 written with PyAV: the digit on two frames (the processor samples 2 per second)
and the number dialled on its AAC sound track, read back by the processor's video path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..processing.documents import build_pdf
from ..processing.video import write_video

IMAGE_PROMPTS = ("which digit is this?", "what digit is shown?")
AUDIO_PROMPTS = ("which number was dialled?", "what digits were dialled?")
DRAW_PROMPTS = ("draw a {d}", "draw the digit {d}")
VIDEO_PROMPT = "which digit is shown and which number is dialled?"
VIDEO_FPS = 2.0  # frames the processor samples per second: two per 1 s clip
PDF_QUESTIONS = {
    "total": "what is the total?",
    "invoice": "what is the invoice number?",
    "digit": "which digit is in the picture?",
}

# ---- handwritten digits ---------------------------------------------------------------------------


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's bundled 8x8 digits (1797 images, ink 0..16), split into train / held-out.

    Returns (train_images, train_labels, test_images, test_labels): images (N, 8, 8) float32 in [0, 1].
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def render_digit(ink: np.ndarray, size: int = 16) -> Image.Image:
    """An 8x8 ink map in [0, 1] -> an RGB PIL image, dark ink on white paper, upscaled bilinearly."""
    gray = (255.0 * (1.0 - np.clip(ink, 0.0, 1.0))).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def shift_images(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 1, fill: float = 1.0):
    """Random translations of up to max_shift pixels per image, paper-coloured fill (N, C, H, W)."""
    N, C, H, W = pixels.shape
    pad = torch.nn.functional.pad(pixels, (max_shift,) * 4, value=fill)  # (N, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * max_shift + 1, (N,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (N,), generator=generator)
    return torch.stack([pad[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(N)])


# ---- DTMF ------------------------------------------------------------------------------------------

# ITU-T Q.23 keypad: (row frequency, column frequency) in Hz
DTMF = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477),
    "0": (941, 1336),
}  # fmt: skip


def dtmf_clip(
    digits: str, rng: np.random.Generator, rate: int = 16000, max_seconds: float = 1.0
) -> np.ndarray:
    """A dialled digit string: tones of 40-100 ms with 40-80 ms gaps, a random lead-in, per-tone
    amplitude and twist, +-1% frequency error, and white noise at 12-30 dB SNR. At most 5 digits
    fit into max_seconds (40 + 5 x 180 ms), so a clip is one encoder window."""
    pieces = [np.zeros(int(rng.uniform(0.0, 0.04) * rate), np.float32)]
    for ch in digits:
        low, high = DTMF[ch]
        n = int(rng.uniform(0.04, 0.10) * rate)
        t = np.arange(n) / rate
        amp = rng.uniform(0.15, 0.6)
        twist = rng.uniform(0.7, 1.3)
        tone = amp * np.sin(2 * np.pi * low * rng.uniform(0.99, 1.01) * t + rng.uniform(0, 2 * np.pi))
        tone += (
            amp * twist * np.sin(2 * np.pi * high * rng.uniform(0.99, 1.01) * t + rng.uniform(0, 2 * np.pi))
        )
        ramp = min(n // 4, int(0.005 * rate))  # 5 ms fades: no clicks
        env = np.ones(n)
        env[:ramp] = np.linspace(0, 1, ramp)
        env[n - ramp :] = np.linspace(1, 0, ramp)
        pieces += [(tone * env).astype(np.float32), np.zeros(int(rng.uniform(0.04, 0.08) * rate), np.float32)]
    wav = np.concatenate(pieces)[: int(max_seconds * rate)]
    signal_power = np.mean(wav**2) + 1e-12
    snr_db = rng.uniform(12.0, 30.0)
    wav = wav + rng.normal(0.0, np.sqrt(signal_power / 10 ** (snr_db / 10)), wav.shape).astype(np.float32)
    return wav.astype(np.float32)


def video_clip(ink: np.ndarray, number: str, rng: np.random.Generator, size: int = 16, rate: int = 16000):
    """MP4 bytes of a 1 s clip: the digit on two frames (the second moved by a pixel) at VIDEO_FPS and
    the number dialled on the sound track."""
    shift = [int(v) for v in rng.integers(-1, 2, 2)]
    frames = [render_digit(ink, size), render_digit(np.roll(ink, shift, axis=(0, 1)), size)]
    wav = dtmf_clip(number, rng, rate, max_seconds=1.0)
    wav = np.pad(wav, (0, rate - len(wav)))  # exactly 1 s: one audio window
    return write_video(frames, fps=VIDEO_FPS, audio=wav, audio_rate=rate)


def sheet_bytes(invoice: str, total: str) -> bytes:
    """An XLSX invoice (openpyxl): the invoice number and the total in a two-column sheet."""
    import io

    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Invoice"
    ws.append(["invoice", int(invoice)])
    ws.append(["total", int(total)])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def random_number(rng: np.random.Generator, min_len: int = 3, max_len: int = 5) -> str:
    return "".join(rng.choice(list("0123456789"), size=int(rng.integers(min_len, max_len + 1))))


# ---- samples -----------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One training or evaluation example. prompt holds placeholders already expanded."""

    task: str  # "image" | "audio" | "pdf" | "sheet" | "draw" | "video"
    prompt: list[int]
    answer: list[int]  # what the model must generate, eos included
    pixel_values: torch.Tensor | None = None  # (n_images, 3, H, W): a video's frames are its images
    input_features: torch.Tensor | None = None  # (n_windows, n_mels, frames)
    target: str = ""  # the answer as text (digits), or the digit to draw


class TaskBuilder:
    """Turns digits, numbers and documents into Samples through the model's real processor."""

    def __init__(self, processor, code_offset: int, image_size: int = 16):
        self.processor = processor
        self.tok = processor.tokenizer
        self.code_offset = code_offset  # id of image code 0 in the decoder vocabulary
        self.image_size = image_size
        self.eos = self.tok.eos_token_id
        self._prompt_cache: dict[tuple, list[int]] = {}

    def answer_ids(self, text: str) -> list[int]:
        return self.tok.encode(text) + [self.eos]

    def _prompt(self, text: str, n_images: int = 0, n_audio: int = 0) -> list[int]:
        """Prompt ids as processor(text=..., images=..., audio=...) builds them. They do not depend on
        the pixels or samples (every demo clip fits one audio window), so they are cached per template."""
        key = (text, n_images, n_audio)
        if key not in self._prompt_cache:
            images = [render_digit(np.zeros((8, 8)), self.image_size)] * n_images
            rate = self.processor.audio_processor.sampling_rate if n_audio else 16000
            audio = [np.zeros(rate // 2, np.float32)] * n_audio
            batch = self.processor(text=text, images=images, audio=audio, sampling_rate=rate)
            self._prompt_cache[key] = batch["input_ids"][0].tolist()
        return self._prompt_cache[key]

    def image_samples(
        self, images: np.ndarray, labels, rng: np.random.Generator, prompt: int | None = None
    ) -> list[Sample]:
        """Ink maps (N, 8, 8) -> "which digit is this?" samples (prompt: a template index, else random)."""
        pixels = self.processor.image_processor([render_digit(im, self.image_size) for im in images])
        prompts = [prompt if prompt is not None else int(rng.integers(len(IMAGE_PROMPTS))) for _ in labels]
        return self.image_samples_from_pixels(pixels, labels, prompts)

    def image_samples_from_pixels(self, pixels: torch.Tensor, labels, prompts) -> list[Sample]:
        """Processed pixels (N, 3, H, W) -> samples; prompts are template indices."""
        return [
            Sample(
                "image",
                self._prompt(IMAGE_PROMPTS[p], n_images=1),
                self.answer_ids(str(label)),
                pixels[i : i + 1],
                target=str(label),
            )
            for i, (label, p) in enumerate(zip(labels, prompts))
        ]

    def audio_samples(
        self, n: int, rng: np.random.Generator, prompt: int | None = None, lengths: tuple[int, int] = (3, 5)
    ) -> list[Sample]:
        """n fresh dialled numbers of lengths[0]..lengths[1] digits -> "which number was dialled?" samples."""
        numbers = [random_number(rng, *lengths) for _ in range(n)]
        ap = self.processor.audio_processor
        clips = [dtmf_clip(s, rng, ap.sampling_rate, ap.window_seconds) for s in numbers]
        feats = ap(clips, sampling_rate=ap.sampling_rate)["input_features"]  # (n, n_mels, frames)
        out = []
        for i, s in enumerate(numbers):
            p = prompt if prompt is not None else int(rng.integers(len(AUDIO_PROMPTS)))
            out.append(
                Sample(
                    "audio",
                    self._prompt(AUDIO_PROMPTS[p], n_audio=1),
                    self.answer_ids(s),
                    input_features=feats[i : i + 1],
                    target=s,
                )
            )
        return out

    def pdf_samples(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        """A one-page invoice PDF per digit image, read back by the processor's document path
        (omnilm.processing.documents.load_document), with one question about it."""
        out = []
        kinds = list(PDF_QUESTIONS)
        for im, label in zip(images, labels):
            invoice, total = random_number(rng, 4, 4), str(int(rng.integers(10, 100)))
            pdf = build_pdf([[("text", f"Invoice {invoice} total {total}"), ("image", render_digit(im, 32))]])
            kind = kinds[int(rng.integers(len(kinds)))]
            batch = self.processor(text=PDF_QUESTIONS[kind], files=[pdf])
            target = {"total": total, "invoice": invoice, "digit": str(label)}[kind]
            out.append(
                Sample(
                    "pdf",
                    batch["input_ids"][0].tolist(),
                    self.answer_ids(target),
                    pixel_values=batch["pixel_values"],
                    target=target,
                )
            )
        return out

    def sheet_samples(self, n: int, rng: np.random.Generator) -> list[Sample]:
        """XLSX invoices read by the processor's document path, asked for the total or the number."""
        out = []
        for _ in range(n):
            invoice, total = random_number(rng, 4, 4), str(int(rng.integers(10, 100)))
            invoice = invoice.lstrip("0").rjust(4, "1")  # stored as a number: no leading zero
            kind = ("total", "invoice")[int(rng.integers(2))]
            batch = self.processor(text=PDF_QUESTIONS[kind], files=[sheet_bytes(invoice, total)])
            target = total if kind == "total" else invoice
            out.append(
                Sample("sheet", batch["input_ids"][0].tolist(), self.answer_ids(target), target=target)
            )
        return out

    def video_samples(self, images: np.ndarray, labels, rng: np.random.Generator) -> list[Sample]:
        """A real MP4 per digit (frames + dialled number), read back through processor(files=[clip])."""
        out = []
        for im, label in zip(images, labels):
            number = random_number(rng)
            batch = self.processor(text=VIDEO_PROMPT, files=[video_clip(im, number, rng, self.image_size)])
            target = f"{label} {number}"
            out.append(
                Sample(
                    "video",
                    batch["input_ids"][0].tolist(),
                    self.answer_ids(target),
                    pixel_values=batch["pixel_values"],  # (2, 3, H, W)
                    input_features=batch["input_features"],  # (1, n_mels, frames)
                    target=target,
                )
            )
        return out

    def video_samples_from_pixels(
        self, pixels: torch.Tensor, labels, rng: np.random.Generator, template: list[int]
    ) -> list[Sample]:
        """Fast training variant: frames (N, 2, 3, H, W) and fresh tones go straight to the processors,
        with the prompt ids of a real clip (`template`: every 1 s clip at 2 frames/s gives the same)."""
        ap = self.processor.audio_processor
        numbers = [random_number(rng) for _ in labels]
        clips = [dtmf_clip(s, rng, ap.sampling_rate, ap.window_seconds) for s in numbers]
        feats = ap(clips, sampling_rate=ap.sampling_rate)["input_features"]  # (N, n_mels, frames)
        return [
            Sample(
                "video",
                template,
                self.answer_ids(f"{label} {s}"),
                pixel_values=pixels[i],
                input_features=feats[i : i + 1],
                target=f"{label} {s}",
            )
            for i, (label, s) in enumerate(zip(labels, numbers))
        ]

    def draw_samples(self, codes: torch.Tensor, labels: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        """codes (N, h, w) of the digit images -> "draw a 7" with the codes as the answer."""
        out = []
        for c, label in zip(codes, labels):
            prompt = self._prompt(DRAW_PROMPTS[int(rng.integers(len(DRAW_PROMPTS)))].format(d=int(label)))
            answer = [
                self.tok.image_start_id,
                *(c.flatten() + self.code_offset).tolist(),
                self.tok.image_end_id,
                self.eos,
            ]
            out.append(Sample("draw", prompt, answer, target=str(label)))
        return out

    def draw_prompt(self, digit: int) -> list[int]:
        return self._prompt(DRAW_PROMPTS[0].format(d=digit))


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-padded training batch: input_ids, labels (-100 off the answers), media in row order."""
    rows = [s.prompt + s.answer for s in samples]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (s, r) in enumerate(zip(samples, rows)):
        ids[b, : len(r)] = torch.tensor(r)
        labels[b, len(s.prompt) : len(r)] = torch.tensor(s.answer)
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    feats = [s.input_features for s in samples if s.input_features is not None]
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.cat(pix) if pix else None,
        "input_features": torch.cat(feats) if feats else None,
    }
