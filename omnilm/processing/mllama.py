"""Llama-3.2-Vision preprocessing, equal to transformers' MllamaImageProcessor and MllamaProcessor.

An image is resized (aspect kept) onto the best canvas of tile_size x tile_size tiles among the
supported grids, padded with zeros at the bottom/right, rescaled and normalised, and cut into tiles
(row-major); images are padded to max_num_tiles tiles and a batch to its largest image count.
The cross-attention mask opens image i's tiles from its <|image|> token on, up to the next image
marker (consecutive markers share the text after them), as transformers' processor builds it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import all_aspect_ratios
from ..errors import ConfigError, MediaError
from .image import MAX_BYTES, MAX_PIXELS, RESAMPLE, load_image, to_rgb

IMAGENET_STANDARD = [0.5, 0.5, 0.5]


@dataclass
class MllamaImageProcessor:
    tile_size: int = 560
    max_num_tiles: int = 4
    resample: int = 2  # PIL.Image.Resampling.BILINEAR
    rescale_factor: float = 1 / 255
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_STANDARD))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STANDARD))
    do_rescale: bool = True
    do_normalize: bool = True
    supported_aspect_ratios: list[list[int]] | None = None  # None: every grid of <= max_num_tiles
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.resample not in RESAMPLE:
            raise ConfigError(f"preprocessor_config.json: resample {self.resample!r} is not a PIL filter")
        if self.max_num_tiles < 1 or self.tile_size < 1:
            raise ConfigError("preprocessor_config.json: max_image_tiles and size must be positive")
        if self.supported_aspect_ratios is None:
            self.supported_aspect_ratios = all_aspect_ratios(self.max_num_tiles)
        for r in self.supported_aspect_ratios:
            if r[0] * r[1] > self.max_num_tiles:
                raise ConfigError(
                    f"aspect ratio {r} has {r[0] * r[1]} tiles, over max_num_tiles {self.max_num_tiles}"
                )

    @classmethod
    def from_dict(cls, d: dict) -> MllamaImageProcessor:
        size = d.get("size") or {"height": 560, "width": 560}
        if size.get("height") != size.get("width") or not size.get("height"):
            raise ConfigError(f"preprocessor_config.json: size {size} must be square (height == width)")
        for key in ("do_resize", "do_pad"):
            if d.get(key) is False:
                raise ConfigError(f"preprocessor_config.json: {key}: false is not supported for mllama")
        return cls(
            tile_size=size["height"],
            max_num_tiles=d.get("max_image_tiles", 4),
            resample=d.get("resample", 2),
            rescale_factor=d.get("rescale_factor", 1 / 255),
            image_mean=list(d.get("image_mean", IMAGENET_STANDARD)),
            image_std=list(d.get("image_std", IMAGENET_STANDARD)),
            do_rescale=d.get("do_rescale", True),
            do_normalize=d.get("do_normalize", True),
        )

    @classmethod
    def from_pretrained(cls, path) -> MllamaImageProcessor:
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            raise ConfigError(f"{f}: not found")
        return cls.from_dict(json.loads(f.read_text()))

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "MllamaImageProcessor",
            "do_resize": True,
            "do_pad": True,
            "do_convert_rgb": True,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "size": {"height": self.tile_size, "width": self.tile_size},
            "max_image_tiles": self.max_num_tiles,
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    # ---- one image ------------------------------------------------------------------------------------

    def canvas(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles: the smallest upscale that fits, else the least downscale; ties by area."""
        best, best_key = None, None
        for rows, cols in all_aspect_ratios(self.max_num_tiles):
            scale = min(rows * self.tile_size / height, cols * self.tile_size / width)
            # upscales (>= 1) rank first, the smallest of them; then downscales, the largest
            key = (0, scale, rows * cols) if scale >= 1 else (1, -scale, rows * cols)
            if best_key is None or key < best_key:
                best, best_key = (rows, cols), key
        return best

    def resized_size(self, height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
        """transformers' get_image_size_fit_to_canvas."""
        ch, cw, t = rows * self.tile_size, cols * self.tile_size, self.tile_size
        th, tw = min(max(height, t), ch), min(max(width, t), cw)
        sh, sw = th / height, tw / width
        if sw < sh:
            return min(math.floor(height * sw) or 1, th), tw
        return th, min(math.floor(width * sh) or 1, tw)

    def preprocess(self, img: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One RGB image -> tiles (rows * cols, 3, tile, tile) float32 and its grid (rows, cols)."""
        rows, cols = self.canvas(img.height, img.width)
        if [rows, cols] not in self.supported_aspect_ratios:
            raise MediaError(
                f"image of {img.width}x{img.height} needs a {rows}x{cols} tile grid, which is not among the "
                f"supported aspect ratios {self.supported_aspect_ratios}"
            )
        h, w = self.resized_size(img.height, img.width, rows, cols)
        img = img.resize((w, h), resample=self.resample)
        t = self.tile_size
        a = np.zeros((rows * t, cols * t, 3), np.uint8)
        a[:h, :w] = np.asarray(img)
        if self.do_rescale:  # float64 then float32, as transformers' rescale
            a = (a.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            a = a.astype(np.float32)
        if self.do_normalize:
            a = (a - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        a = (
            a.transpose(2, 0, 1).reshape(3, rows, t, cols, t).transpose(1, 3, 0, 2, 4)
        )  # (rows, cols, 3, t, t)
        return np.ascontiguousarray(a.reshape(rows * cols, 3, t, t)), (rows, cols)

    def load(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        return load_image(image, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    # ---- a batch --------------------------------------------------------------------------------------

    def __call__(self, images) -> dict:
        """images: a list (one per prompt) of lists of paths/bytes/PIL images (a flat list: one prompt)
        -> pixel_values (B, N, max_num_tiles, 3, t, t), aspect_ratio_ids (B, N), aspect_ratio_mask
        (B, N, max_num_tiles), num_tiles (list of lists)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images or not isinstance(images[0], (list, tuple)):
            images = [images]
        B, N, T, t = len(images), max(len(row) for row in images), self.max_num_tiles, self.tile_size
        if N == 0:
            raise MediaError("no images given")
        pixel_values = np.zeros((B, N, T, 3, t, t), np.float32)
        ids = np.zeros((B, N), np.int64)
        mask = np.zeros((B, N, T), np.int64)
        mask[:, :, 0] = 1  # padding images keep their first tile "on", as transformers does
        num_tiles = []
        for b, row in enumerate(images):
            num_tiles.append([])
            for i, image in enumerate(row):
                tiles, (rows, cols) = self.preprocess(self.load(image))
                pixel_values[b, i, : len(tiles)] = tiles
                ids[b, i] = self.supported_aspect_ratios.index([rows, cols]) + 1
                mask[b, i, : len(tiles)] = 1
                num_tiles[b].append(len(tiles))
        return dict(
            pixel_values=torch.from_numpy(pixel_values),
            aspect_ratio_ids=torch.from_numpy(ids),
            aspect_ratio_mask=torch.from_numpy(mask),
            num_tiles=num_tiles,
        )


def image_spans(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the text each image is visible to (transformers' get_cross_attention_token_mask)."""
    locs = [i for i, tok in enumerate(ids) if tok == image_token_id]
    if not locs:
        return []
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])] + [[locs[-1], len(ids)]]
    end = spans[-1][1]
    for span in reversed(spans):  # a marker followed directly by another shares the later text
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [tuple(s) for s in spans]


def cross_attention_mask(
    batch_ids: list[list[int]],
    num_tiles: list[list[int]],
    image_token_id: int,
    max_num_tiles: int,
    length: int,
) -> torch.Tensor:
    """(B, length, N_images, max_num_tiles) int64: 1 where a text token sees a tile of an image.

    Each prompt must have as many <|image|> markers as images (MediaError otherwise)."""
    B, N = len(batch_ids), max((len(t) for t in num_tiles), default=0)
    out = torch.zeros(B, length, N, max_num_tiles, dtype=torch.long)
    for b, (ids, tiles) in enumerate(zip(batch_ids, num_tiles)):
        spans = image_spans(list(ids), image_token_id)
        if len(spans) != len(tiles):
            raise MediaError(
                f"prompt {b} has {len(spans)} <|image|> markers but {len(tiles)} images were given "
                "(one marker per image)"
            )
        for i, ((start, end), n) in enumerate(zip(spans, tiles)):
            if n > max_num_tiles:
                raise MediaError(f"image {i} of prompt {b} has {n} tiles, over max_num_tiles {max_num_tiles}")
            out[b, start : min(end, length), i, :n] = 1
    return out


class MllamaProcessor:
    """Text with <|image|> markers plus images -> the inputs MllamaModel takes (transformers' names).

    The marker becomes the model's image token id (config.json image_token_index); the rest of the
    text is encoded as untrusted text. A batch of prompts is left-padded (generation needs that)."""

    renders_chats = True  # chat messages as training renders them (see _chat)

    def __init__(self, tokenizer, image_processor: MllamaImageProcessor, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.prompt_format = "plain"

    @classmethod
    def from_pretrained(cls, path, tokenizer=None) -> MllamaProcessor:
        """A `model_type: mllama` directory, or an OmniLM one with cross-attention fusion (a composed
        model: a SigLIP/CLIP tower, one tile per image, its own preprocessor_config.json). tokenizer:
        None (the directory's own, required), a directory holding one, or a TextTokenizer."""
        from ..convert.files import require_tokenizer
        from ..tokenizers.text import TextTokenizer

        path = Path(path)
        tok = tokenizer
        if not isinstance(tok, TextTokenizer):
            tok_dir = path if tok is None else Path(tok)
            require_tokenizer(tok_dir, what="model directory" if tok is None else "tokenizer directory")
            tok = TextTokenizer.from_dir(tok_dir)
        f = path / "preprocessor_config.json"
        pre = json.loads(f.read_text()) if f.is_file() else None
        if (path / OMNILM_CONFIG).is_file():
            from ..config import ModelConfig
            from .image import ImageProcessor

            ca = ModelConfig.from_dict(json.loads((path / OMNILM_CONFIG).read_text())).cross_attention
            side = ca.vision.image_size
            images = ImageProcessor.from_dict(pre) if pre else ImageProcessor(size=(side, side))
            return cls(tok, SingleTileImages(images), ca.image_token_id)
        hf = json.loads((path / "config.json").read_text())
        vision = hf.get("vision_config") or {}
        max_tiles, side = vision.get("max_num_tiles", 4), vision.get("image_size", 560)
        pre = pre or {}
        pre.setdefault("size", {"height": side, "width": side})
        proc = MllamaImageProcessor.from_dict(pre)
        if proc.max_num_tiles > max_tiles:
            raise ConfigError(
                f"{f}: max_image_tiles {proc.max_num_tiles} is over the model's max_num_tiles {max_tiles}"
            )
        if proc.tile_size != side:
            raise ConfigError(f"{f}: tile size {proc.tile_size} != the model's vision image_size {side}")
        proc.supported_aspect_ratios = vision.get("supported_aspect_ratios") or all_aspect_ratios(max_tiles)
        proc.max_num_tiles = max_tiles
        return cls(tok, proc, hf.get("image_token_index", 128256))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Markers at the very start stay before bos, as transformers' processor puts them
        ("<|image|><|begin_of_text|>..."); the others become the image id where they stand."""
        lead = 0
        while text.startswith(IMAGE_MARKER):
            text, lead = text[len(IMAGE_MARKER) :], lead + 1
        pieces = text.split(IMAGE_MARKER)
        ids = [self.image_token_id] * lead + self.tokenizer.encode(pieces[0], add_bos=add_bos)
        for piece in pieces[1:]:
            ids += [self.image_token_id] + self.tokenizer.encode(piece)
        return ids

    def __call__(self, text=None, images=None, audio=None, files=None, messages=None, add_bos=True, **_):
        """text (one prompt or a batch, one <|image|> marker per image) or messages (one chat, rendered
        by the checkpoint's template, else the built-in format, as training renders it; image parts
        without a source take `images` in order)."""
        if audio or files:
            raise ConfigError("an mllama model takes text and images only (no audio or files)")
        if messages is not None:
            return self._chat(messages, images)
        if text is None:
            raise ConfigError("an mllama prompt needs text (with one <|image|> marker per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images and not isinstance(images[0], (list, tuple)):
            images = [images] if len(texts) == 1 else [[im] for im in images]
        return self._batch([self.encode(t, add_bos) for t in texts], images)

    def _chat(self, messages, images=None) -> dict:
        from ..tokenizers.chat import render_chat_with_media

        ids, _, media = render_chat_with_media(messages, self.tokenizer, add_generation_prompt=True)
        given = iter(images or [])
        sources = [src if src is not None else next(given, None) for kind, src in media if kind == "image"]
        if len(sources) != len(media) or any(s is None for s in sources) or next(given, None) is not None:
            raise MediaError(
                f"the messages have {len(media)} image part(s) (and no audio) but the images do not match them"
            )
        marker = self.tokenizer.image_token_id  # the template's placeholder -> the model's image token
        ids = [self.image_token_id if t == marker else t for t in ids]
        return self._batch([ids], [sources] if sources else None)

    def _batch(self, rows: list[list[int]], images) -> dict:
        """Left-padded rows, their images tiled, the cross-attention mask (counts checked first)."""
        counts = [len(r) for r in images] if images else [0] * len(rows)
        for b, (ids, n) in enumerate(zip(rows, counts)):  # checked before any image is decoded
            markers = ids.count(self.image_token_id)
            if markers != n:
                raise MediaError(
                    f"prompt {b} has {markers} <|image|> markers but {n} images were given (one marker per image)"
                )
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        out = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=None, input_features=None)
        if images and any(images):
            batch = self.image_processor([list(r) for r in images])
            out.update(
                pixel_values=batch["pixel_values"],
                aspect_ratio_ids=batch["aspect_ratio_ids"],
                aspect_ratio_mask=batch["aspect_ratio_mask"],
                cross_attention_mask=cross_attention_mask(
                    input_ids.tolist(),
                    batch["num_tiles"],
                    self.image_token_id,
                    self.image_processor.max_num_tiles,
                    T,
                ),
            )
        return out


class SingleTileImages:
    """A SigLIP/CLIP ImageProcessor seen as a tiler of one tile per image (composed models)."""

    max_num_tiles = 1

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images: list[list]) -> dict:
        B, N = len(images), max(len(row) for row in images)
        rows = [self.image_processor(list(row)) if row else None for row in images]  # (N_b, 3, H, W)
        shape = next(r.shape[1:] for r in rows if r is not None)
        pixel_values = torch.zeros(B, N, 1, *shape)
        ids = torch.zeros(B, N, dtype=torch.long)
        for b, r in enumerate(rows):
            if r is not None:
                pixel_values[b, : len(r), 0] = r
                ids[b, : len(r)] = 1
        return dict(
            pixel_values=pixel_values,
            aspect_ratio_ids=ids,  # 0 marks a padding image
            aspect_ratio_mask=ids[:, :, None].clone(),
            num_tiles=[[1] * len(row) for row in images],
        )


IMAGE_MARKER = "<|image|>"
OMNILM_CONFIG = "omnilm_config.json"


def is_mllama_dir(path) -> bool:
    """A `model_type: mllama` directory or an OmniLM one with cross-attention fusion."""
    path = Path(path)
    try:
        if (path / OMNILM_CONFIG).is_file():
            return json.loads((path / OMNILM_CONFIG).read_text()).get("cross_attention") is not None
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text()).get("model_type") == "mllama"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # the regular loaders name the broken file
    return False
