"""Image decoding and the SigLIP / CLIP image processor.

`load_image` is the one door for untrusted image bytes: the byte budget is checked from the file size
and the pixel budget from the header (Pillow's `open` reads only the header), both before any pixel
is decoded. Only PNG, JPEG, WebP, BMP and GIF are opened, so Pillow's rarer plugins never see input.

`ImageProcessor` reproduces transformers' SiglipImageProcessor / CLIPImageProcessor (PIL backend)
numerically: PIL resize on the 8-bit image, rescale in float64 then float32, normalize in float32.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, MediaError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_BYTES = 50 * 1024**2  # 50 MiB of encoded image
MAX_PIXELS = 50_000_000  # ~ 8660 x 5773; an RGB decode of this is ~150 MB


def load_image(src, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a path or bytes into an 8-bit RGB PIL image (EXIF orientation applied, first GIF frame).

    Raises MediaError naming the file for a missing, oversized, truncated or non-image input.
    """
    name, data = _read_bytes(src, max_bytes)
    # Pillow warns (to stderr) about bombs, odd EXIF and palettes; the MediaError below says what failed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # header only: size known, nothing decoded
        except Image.DecompressionBombError:
            raise MediaError(f"{name}: image is larger than Pillow's decompression-bomb limit") from None
        except Image.UnidentifiedImageError:  # its message names our BytesIO, not the file
            raise MediaError(f"{name}: not an image in a supported format ({', '.join(FORMATS)})") from None
        except _DECODE_ERRORS as e:
            raise MediaError(f"{name}: not a decodable image ({', '.join(FORMATS)}): {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise MediaError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")
        if w <= 0 or h <= 0:
            raise MediaError(f"{name}: image header gives an empty size {w}x{h}")
        try:
            img.seek(0)  # GIF / animated WebP: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.width * img.height > max_pixels:  # EXIF cannot grow it, but check what is returned
                raise MediaError(f"{name}: {img.width}x{img.height} exceeds the limit of {max_pixels} pixels")
            return to_rgb(img)
        except Image.DecompressionBombError:
            raise MediaError(f"{name}: image is larger than Pillow's decompression-bomb limit") from None
        except _DECODE_ERRORS as e:  # Pillow reports truncation as OSError, bad tables in many ways
            raise MediaError(f"{name}: image data is truncated or corrupt: {type(e).__name__}: {e}") from None


# what Pillow's decoders raise on malformed data (struct.error, IndexError, ... from its plugins)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ZeroDivisionError, AttributeError, OverflowError)  # fmt: skip


def _read_bytes(src, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > max_bytes:
            raise MediaError(f"<bytes>: {len(data)} bytes exceeds the image limit of {max_bytes} bytes")
        return "<bytes>", data
    path = Path(src)
    if not path.is_file():
        raise MediaError(f"{path}: no such image file")
    size = path.stat().st_size
    if size > max_bytes:
        raise MediaError(f"{path}: {size} bytes exceeds the image limit of {max_bytes} bytes")
    return str(path), path.read_bytes()


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, palettes expanded, 16-bit scaled down to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (Pillow opens 16-bit PNG gray as I;16 or I): 0..65535 -> 0..255
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")  # (H, W) uint8 -> L
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---- the processor ---------------------------------------------------------------------------------------

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# keys of preprocessor_config.json that would change the output and that this processor does not do
_UNSUPPORTED = ("do_pad", "do_image_splitting", "do_reduce_labels")


@dataclass
class ImageProcessor:
    """preprocessor_config.json's SiglipImageProcessor / CLIPImageProcessor fields -> pixel_values (N, 3, H, W)."""

    size: tuple[int, int] | None = (224, 224)  # (height, width); None when shortest_edge is used
    shortest_edge: int | None = None  # CLIP: resize the short side to this, keeping the aspect ratio
    do_center_crop: bool = False
    crop_size: tuple[int, int] = (224, 224)
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.resample not in RESAMPLE:
            raise ConfigError(
                f"preprocessor_config.json: resample {self.resample!r} is not a PIL filter "
                f"(expected one of {sorted(RESAMPLE)})"
            )
        if self.do_resize and self.size is None and self.shortest_edge is None:
            raise ConfigError("preprocessor_config.json: size needs height and width, or shortest_edge")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("preprocessor_config.json: image_mean and image_std need 3 values")

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessor:
        for key in _UNSUPPORTED:
            if d.get(key):
                raise ConfigError(f"preprocessor_config.json: {key}=true is not supported")
        kw = {}
        size = d.get("size")
        if isinstance(size, int):  # legacy CLIP configs: an int is the shortest edge
            size = {"shortest_edge": size}
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                kw["size"] = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                kw["size"], kw["shortest_edge"] = None, int(size["shortest_edge"])
            else:
                raise ConfigError(
                    f"preprocessor_config.json: size {size} needs height and width, or shortest_edge"
                )
        crop = d.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if isinstance(crop, dict):
            kw["crop_size"] = (int(crop["height"]), int(crop["width"]))
        for key in (
            "do_center_crop",
            "resample",
            "do_resize",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
        ):
            if d.get(key) is not None:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                kw[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path) -> ImageProcessor:
        f = Path(path) / "preprocessor_config.json" if Path(path).is_dir() else Path(path)
        if not f.is_file():
            raise ConfigError(f"{f}: no preprocessor_config.json")
        from ..convert.validate import read_json

        return cls.from_dict(read_json(f, error=ConfigError))

    def to_dict(self) -> dict:
        """The preprocessor_config.json fields transformers reads back."""
        size = (
            {"shortest_edge": self.shortest_edge}
            if self.size is None
            else {"height": self.size[0], "width": self.size[1]}
        )
        return {
            "image_processor_type": "CLIPImageProcessor" if self.do_center_crop else "SiglipImageProcessor",
            "size": size,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    def __call__(self, images) -> torch.Tensor:
        """images: one or a list of paths, bytes or PIL images -> float32 pixel_values (N, 3, H, W)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = [self.preprocess(self.load(im)) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(
                f"images processed to different shapes {sorted(shapes)}; set a fixed size or crop_size"
            )
        return torch.from_numpy(np.stack(arrays))

    def load(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        return load_image(image, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """One RGB image -> (3, H, W) float32."""
        if self.do_resize:
            img = img.resize(self.output_size(img.width, img.height)[::-1], resample=self.resample)
        a = np.asarray(img)  # (H, W, 3) uint8
        if self.do_center_crop:
            a = center_crop(a, *self.crop_size)
        if self.do_rescale:  # float64 then float32, as transformers' rescale
            a = (a.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            a = a.astype(np.float32)
        if self.do_normalize:
            a = (a - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1))  # (3, H, W)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after resize: fixed, or the short side to shortest_edge (long side truncated, as HF)."""
        if self.size is not None:
            return self.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(H, W, C) -> (ch, cw, C); zero padding (centred) first when the image is smaller than the crop."""
    H, W = a.shape[:2]
    if H < ch or W < cw:
        nh, nw = max(H, ch), max(W, cw)
        padded = np.zeros((nh, nw) + a.shape[2:], a.dtype)
        top, left = -(-(nh - H) // 2), -(-(nw - W) // 2)  # ceil, as transformers pads
        padded[top : top + H, left : left + W] = a
        a, H, W = padded, nh, nw
    top, left = (H - ch) // 2, (W - cw) // 2
    return a[top : top + ch, left : left + cw]
