"""The multimodal processor: text, images, audio, files and chat messages -> model inputs.

This is the ONLY place that decides placeholder counts. A prompt carries one marker per medium
(`<|image|>` / `<|audio|>`, or a chat part of type image/audio); the processor checks that markers and
media match one to one, runs the image/audio processors, and expands every marker into the run of
placeholder ids the encoder will fill: `tokens_per_image` per image, and `windows x tokens_per_window`
per audio clip (the audio processor reports each clip's windows). User text is encoded with special
tokens not parsed, so it cannot smuggle placeholders; only markers given as such are expanded.

    processor = load_processor(model_dir)
    batch = processor(text="<|image|>which digit is this?", images=["seven.png"])
    batch = processor(messages=[{"role": "user", "content": [{"type": "image", "image": "7.png"}, ...]}])
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ConfigError, MediaError
from ..tokenizers.chat import render_chat_with_media
from ..tokenizers.text import AUDIO, IMAGE, TextTokenizer
from .documents import load_document

PROCESSOR_CONFIG = "processor_config.json"
AUDIO_PREPROCESSOR_CONFIG = "audio_preprocessor_config.json"  # when a model takes images and audio


class Processor:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        image_processor=None,
        audio_processor=None,
        tokens_per_image: int | None = None,
        tokens_per_audio_window: int | None = None,
        image_token_id: int | None = None,
        audio_token_id: int | None = None,
        prompt_format: str = "plain",
        video_fps: float = 1.0,
        max_video_frames: int = 32,
    ):
        if prompt_format not in ("plain", "chat"):
            raise ConfigError(f"prompt_format must be 'plain' or 'chat', got {prompt_format!r}")
        self.prompt_format = prompt_format  # how the model was trained to read prompts (the CLI follows it)
        # a video file becomes frames (each an image) sampled at video_fps, at most max_video_frames
        self.video_fps, self.max_video_frames = video_fps, max_video_frames
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.audio_processor = audio_processor
        self.tokens_per_image = tokens_per_image
        if tokens_per_audio_window is None and audio_processor is not None:
            tokens_per_audio_window = audio_processor.tokens_per_window
        self.tokens_per_audio_window = tokens_per_audio_window
        self.image_token_id = tokenizer.image_token_id if image_token_id is None else image_token_id
        self.audio_token_id = tokenizer.audio_token_id if audio_token_id is None else audio_token_id
        # The marker strings a text prompt may use: OmniLM's, and the tokenizer's own name for the
        # placeholder id (LLaVA's "<image>").
        self._markers = {IMAGE: "image", AUDIO: "audio"}
        for kind, tok_id in (("image", self.image_token_id), ("audio", self.audio_token_id)):
            name = tokenizer.id_to_token(tok_id) if tok_id is not None else None
            if name and tok_id in tokenizer.special_ids:
                self._markers.setdefault(name, kind)
        self._marker_re = re.compile(
            "|".join(re.escape(m) for m in sorted(self._markers, key=len, reverse=True))
        )

    @classmethod
    def from_model_config(cls, cfg, tokenizer, image_processor=None, audio_processor=None,
                          prompt_format: str = "plain", meta: dict | None = None, source: str = "processor_config.json"):  # fmt: skip
        """The one constructor from a model: placeholder counts and ids come from the ModelConfig (its
        vision/audio configs and token ids), default image/audio processors from its encoders. `meta`
        (a processor_config.json) may restate a value but not contradict it (ConfigError)."""
        from .audio import AudioProcessor
        from .image import ImageProcessor

        vision, audio = cfg.vision, cfg.audio
        derived = {
            "tokens_per_image": vision.tokens_per_image if vision is not None else None,
            "tokens_per_audio_window": audio.tokens_per_window if audio is not None else None,
            "image_token_id": cfg.image_token_id,
            "audio_token_id": cfg.audio_token_id,
        }
        meta = dict(meta or {})
        if "image_seq_length" in meta:
            meta.setdefault("tokens_per_image", meta["image_seq_length"])
        for key, value in derived.items():
            given = meta.get(key)
            if given is not None and value is not None and given != value:
                raise ConfigError(f"{source}: {key} is {given} but the model config gives {value}")
            if value is None:
                derived[key] = given
        if image_processor is None and vision is not None:
            image_processor = ImageProcessor(size=(vision.image_size, vision.image_size))
        if audio_processor is None and audio is not None:
            audio_processor = AudioProcessor.from_config(audio)
        video = {k: meta[k] for k in ("video_fps", "max_video_frames") if k in meta}
        return cls(tokenizer, image_processor, audio_processor, prompt_format=meta.get("prompt_format", prompt_format),
                   **derived, **video)  # fmt: skip

    # ---- entry point ------------------------------------------------------------------------------

    def __call__(
        self,
        text=None,
        images=None,
        audio=None,
        sampling_rate: int = 16000,
        files=None,
        messages=None,
        add_bos: bool = True,
        add_generation_prompt: bool | None = None,
    ) -> dict:
        """-> {"input_ids", "attention_mask", "pixel_values", "input_features"} (None where absent).

        text: a string or a list of strings (a left-padded batch) with `<|image|>` / `<|audio|>`
        markers; a single text without markers gets one marker per given medium at its start.
        images / audio: media in marker order across the batch (paths, bytes, PIL images, waveforms).
        files: documents whose parts (text, images, audio) come before the single text prompt.
        messages: a conversation (or a list of them) rendered with the chat template; media parts
        without a source take the next item of `images` / `audio`. Also returns "loss_mask".
        """
        images = _as_list(images)
        audio = _as_list(audio)
        if messages is not None:
            if text is not None or files:
                raise ConfigError("give either messages or text (+ files), not both")
            rows, masks, media = self._render_messages(messages, add_generation_prompt)
        elif text is not None or files:
            rows, media = self._render_texts(text, files, add_bos, n_images=len(images), n_audio=len(audio))
            masks = None
        else:
            rows, masks, media = [], None, []

        if rows:
            media = self._fill_media(media, images, audio)
        else:  # media alone, no prompt: just their tensors
            media = [("image", im) for im in images] + [("audio", a) for a in audio]
        image_sources = [src for kind, src in media if kind == "image"]
        audio_sources = [src for kind, src in media if kind == "audio"]

        pixel_values, windows = None, []
        if image_sources:
            pixel_values = self._images(image_sources)
        features = None
        if audio_sources:
            features, windows = self._audio(audio_sources, sampling_rate)

        out = {
            "input_ids": None,
            "attention_mask": None,
            "pixel_values": pixel_values,
            "input_features": features,
        }
        if rows:
            expanded = self.expand(rows, masks, windows)
            out.update(self.pad(*expanded))
        return out

    # ---- rendering --------------------------------------------------------------------------------

    def encode_prompt(self, text: str, add_bos: bool = True) -> list[int]:
        """Text with markers -> ids with ONE marker id per medium (placeholders not yet expanded)."""
        ids = [self.tokenizer.bos_token_id] if add_bos and self.tokenizer.bos_token_id is not None else []
        pos = 0
        for m in self._marker_re.finditer(text):
            ids += self._encode_plain(text[pos : m.start()])
            ids.append(self._marker_id(self._markers[m.group()]))
            pos = m.end()
        return ids + self._encode_plain(text[pos:])

    def _encode_plain(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if {self.image_token_id, self.audio_token_id}.intersection(ids):
            raise ConfigError(f"tokenizer {self.tokenizer.source} encodes plain text into a placeholder id")
        return ids

    def _marker_id(self, kind: str) -> int:
        tok_id = self.image_token_id if kind == "image" else self.audio_token_id
        if tok_id is None:
            raise ConfigError(
                f"this processor has no {kind} placeholder token (tokenizer {self.tokenizer.source})"
            )
        return tok_id

    def _render_texts(self, text, files, add_bos: bool, n_images: int, n_audio: int):
        texts = [text] if isinstance(text, str) or text is None else list(text)
        if files and len(texts) != 1:
            raise ConfigError("files go with a single text prompt, not a batch")
        rows, media = [], []
        for t in texts:
            t = t or ""
            ids = [self.tokenizer.bos_token_id] if add_bos and self.tokenizer.bos_token_id is not None else []
            for f in _as_list(files):
                for kind, value in self.load_file(f):
                    if kind == "text":
                        ids += self._encode_plain(value)
                    else:
                        ids.append(self._marker_id(kind))
                        media.append((kind, value))
                ids += self._encode_plain("\n\n")
            if len(texts) == 1 and not self._marker_re.search(t) and (n_images or n_audio):
                # A plain prompt with media: the media go first, in the order images then audio.
                t = IMAGE * n_images + AUDIO * n_audio + t
            body = self.encode_prompt(t, add_bos=False)
            media += [
                (self._kind_of(i), None) for i in body if i in (self.image_token_id, self.audio_token_id)
            ]
            rows.append(ids + body)
        return rows, media

    def load_file(self, source):
        """A document's parts; a video's sound track is cut into the audio encoder's windows."""
        ap = self.audio_processor
        video = dict(fps=self.video_fps, max_frames=self.max_video_frames)
        if ap is not None:
            video.update(audio_chunk_seconds=ap.window_seconds, audio_rate=ap.sampling_rate)
        return load_document(source, video=video)

    def _kind_of(self, tok_id: int) -> str:
        return "image" if tok_id == self.image_token_id else "audio"

    def _render_messages(self, messages, add_generation_prompt):
        batch = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        rows, masks, media = [], [], []
        for conv in batch:
            gen = add_generation_prompt
            if gen is None:  # prompt for an answer unless the conversation already ends with one
                gen = conv[-1].get("role") != "assistant" if conv and isinstance(conv[-1], dict) else False
            ids, mask, conv_media = render_chat_with_media(
                conv, self.tokenizer, gen, load_file=self.load_file
            )
            rows.append(ids)
            masks.append(mask)
            media += conv_media
        return rows, masks, media

    def _fill_media(self, media, images, audio):
        """Markers without a source take the given images/audio in order; counts must match exactly."""
        queues = {"image": list(images), "audio": list(audio)}
        unfilled = {k: sum(kind == k and src is None for kind, src in media) for k in queues}
        for kind in queues:
            if unfilled[kind] != len(queues[kind]):
                raise MediaError(
                    f"the prompt has {unfilled[kind]} <|{kind}|> marker(s) to fill, but {len(queues[kind])} "
                    f"{kind} input(s) were given; each {kind} needs exactly one marker"
                )
        return [(kind, queues[kind].pop(0) if src is None else src) for kind, src in media]

    # ---- media ------------------------------------------------------------------------------------

    def _images(self, sources) -> torch.Tensor:
        if self.image_processor is None:
            raise ConfigError(
                "images were given, but this processor has no image processor (no vision config)"
            )
        return self.image_processor(sources)  # (N_images, 3, H, W)

    def _audio(self, sources, sampling_rate):
        if self.audio_processor is None:
            raise ConfigError("audio was given, but this processor has no audio processor (no audio config)")
        out = self.audio_processor(sources, sampling_rate=sampling_rate)
        return out["input_features"], out["windows_per_clip"]

    def encode_media(self, kind: str, source, sampling_rate: int = 16000):
        """One medium -> (placeholder ids, tensor): an image gives (3, H, W), a clip its windows (n, ...)."""
        if kind == "image":
            pixels = self._images([source])  # (1, 3, H, W)
            return [self._marker_id("image")] * self._tokens_per_image(), pixels[0]
        if kind == "audio":
            features, windows = self._audio([source], sampling_rate)  # (n_windows, ...)
            return [self._marker_id("audio")] * (windows[0] * self._tokens_per_window()), features
        raise ConfigError(f"unknown media kind {kind!r}; expected 'image' or 'audio'")

    # ---- placeholders -----------------------------------------------------------------------------

    def expand(self, rows, masks=None, windows_per_clip=()):
        """Replace each marker by its run of placeholder ids; masks (if given) get 0 on placeholders."""
        windows = list(windows_per_clip)
        out_rows, out_masks = [], []
        for r, ids in enumerate(rows):
            mask = masks[r] if masks is not None else [0] * len(ids)
            new_ids, new_mask = [], []
            for tok_id, m in zip(ids, mask):
                if tok_id == self.image_token_id:
                    n = self._tokens_per_image()
                elif tok_id == self.audio_token_id:
                    if not windows:
                        raise MediaError("more <|audio|> markers than audio clips")
                    n = windows.pop(0) * self._tokens_per_window()
                else:
                    new_ids.append(tok_id)
                    new_mask.append(m)
                    continue
                new_ids += [tok_id] * n
                new_mask += [0] * n
            out_rows.append(new_ids)
            out_masks.append(new_mask)
        if windows:
            raise MediaError(f"{len(windows)} audio clip(s) have no <|audio|> marker")
        return out_rows, (out_masks if masks is not None else None)

    def _tokens_per_image(self) -> int:
        if not self.tokens_per_image:
            raise ConfigError("this processor does not know tokens_per_image (no vision config was found)")
        return self.tokens_per_image

    def _tokens_per_window(self) -> int:
        if not self.tokens_per_audio_window:
            raise ConfigError(
                "this processor does not know tokens_per_audio_window (no audio config was found)"
            )
        return self.tokens_per_audio_window

    def pad(self, rows, masks=None) -> dict:
        """Left-pad a batch (generation appends on the right): input_ids, attention_mask [, loss_mask]."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        width = max(len(r) for r in rows)
        # padded as lists, one tensor each: the server renders on its event loop, where every torch
        # call is a round trip of the GIL to the engine thread
        left = [width - len(r) for r in rows]
        out = {
            "input_ids": torch.tensor([[pad_id] * n + list(r) for n, r in zip(left, rows)], dtype=torch.long),
            "attention_mask": torch.tensor(
                [[0] * n + [1] * len(r) for n, r in zip(left, rows)], dtype=torch.long
            ),
        }  # (B, T) each
        if masks is not None:
            out["loss_mask"] = torch.tensor(
                [[0] * n + list(m) for n, m in zip(left, masks)], dtype=torch.long
            )
        return out

    # ---- persistence ------------------------------------------------------------------------------

    def save_pretrained(self, path) -> None:
        """tokenizer files + preprocessor_config.json (+ audio_preprocessor_config.json) + processor_config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(path)
        configs = []
        if self.image_processor is not None:
            configs.append(self.image_processor.to_dict())
        if self.audio_processor is not None:
            configs.append(self.audio_processor.to_dict())
        for name, cfg in zip(("preprocessor_config.json", AUDIO_PREPROCESSOR_CONFIG), configs):
            (path / name).write_text(json.dumps(cfg, indent=2) + "\n")
        meta = {
            "processor_class": "OmniLMProcessor",
            "tokens_per_image": self.tokens_per_image,
            "tokens_per_audio_window": self.tokens_per_audio_window,
            "image_token_id": self.image_token_id,
            "audio_token_id": self.audio_token_id,
            "prompt_format": self.prompt_format,
            "video_fps": self.video_fps,
            "max_video_frames": self.max_video_frames,
        }
        (path / PROCESSOR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    def __repr__(self):
        return (
            f"Processor(tokenizer={self.tokenizer!r}, image={type(self.image_processor).__name__}, "
            f"audio={type(self.audio_processor).__name__}, tokens_per_image={self.tokens_per_image}, "
            f"tokens_per_audio_window={self.tokens_per_audio_window})"
        )


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        # a per-row nested list (HF style) is flattened into marker order
        return [item for sub in x for item in (sub if isinstance(sub, (list, tuple)) else [sub])]
    return [x]


# ---- loading --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from ..convert.validate import read_json

    return read_json(path, error=ConfigError)  # bounded: a pickle, non-UTF-8 or deep file is a ConfigError


def _model_config(path: Path):
    """The ModelConfig a model directory describes, as far as the processor needs it (its encoders
    and placeholder ids); a bare ModelConfig for text models and unknown directories."""
    from ..config import ModelConfig

    omni = _read_json(path / "omnilm_config.json")
    if omni is not None:
        return ModelConfig.from_dict(omni)
    hf = _read_json(path / "config.json") or {}
    model_type = hf.get("model_type")
    if model_type in ("llava", "siglip_vision_model", "clip_vision_model", "siglip", "clip"):
        from ..convert.vision import vision_config_from_hf

        token = hf.get("image_token_id", hf.get("image_token_index")) if model_type == "llava" else None
        return ModelConfig(vision=vision_config_from_hf(hf), image_token_id=token)
    if model_type in ("whisper", "wav2vec2"):
        from ..convert.audio import audio_config_from_hf

        return ModelConfig(audio=audio_config_from_hf(hf))
    return ModelConfig()


def load_processor(path) -> Processor:
    """A Processor from a model directory: tokenizer.json (else the embedded default), preprocessor
    configs, and token counts from processor_config.json or the model's config."""
    from .audio import AudioProcessor
    from .image import ImageProcessor

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"processor directory not found: {path}")
    tokenizer = (
        TextTokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else TextTokenizer.default()
    )
    cfg = _model_config(path)
    meta = _read_json(path / PROCESSOR_CONFIG) or {}
    image_proc = audio_proc = None
    for name in ("preprocessor_config.json", AUDIO_PREPROCESSOR_CONFIG):
        d = _read_json(path / name)
        if d is None:
            continue
        if "feature_extractor_type" in d and "image_processor_type" not in d:
            audio_proc = AudioProcessor.from_dict(d, cfg.audio)
        else:
            image_proc = ImageProcessor.from_dict(d)
    return Processor.from_model_config(cfg, tokenizer, image_proc, audio_proc, meta=meta,
                                       source=str(path / PROCESSOR_CONFIG))  # fmt: skip
