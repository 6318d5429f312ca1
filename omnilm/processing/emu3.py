"""The Emu3 processor: prompts with images -> ids and pixels, text-to-image prompts, codes -> PNG.

Image preprocessing is transformers' Emu3ImageProcessor: resize (bicubic) so both sides are
multiples of `spatial_factor` and the area lies in [min_pixels, max_pixels] (its smart_resize),
rescale to [0, 1], normalize with image_mean / image_std. An image whose file is over
`max_pixels` x `max_input_factor` pixels is refused from its header, before decoding. A generated
image's size is given in pixels and must fit `image_area` (the processor's configured area).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import MediaError
from ..tokenizers.text import TextTokenizer
from .image import load_image, to_rgb

IMAGE_START, IMAGE_WRAPPER, IMAGE, EOL, EOF, IMAGE_END = (
    "<|image start|>",
    "<|image token|>",
    "<image>",
    "<|extra_200|>",
    "<|extra_201|>",
    "<|image end|>",
)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Emu3 smart_resize: sides multiples of factor, area within [min_pixels, max_pixels]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


class Emu3Processor:
    prompt_format = "plain"  # Pipeline reads this

    def __init__(
        self,
        tokenizer: TextTokenizer,
        vocabulary_map: dict[str, int],
        vq_spatial_factor: int,
        spatial_factor: int = 8,
        min_pixels: int = 512 * 512,
        max_pixels: int = 1024 * 1024,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        image_area: int = 518400,
        max_input_factor: int = 4,
    ):
        self.tokenizer, self.vocab = tokenizer, vocabulary_map
        self.vq_factor, self.spatial_factor = vq_spatial_factor, spatial_factor
        self.min_pixels, self.max_pixels, self.image_area = min_pixels, max_pixels, image_area
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)
        self.max_input_pixels = max_pixels * max_input_factor
        visual = sorted(
            (int(k[-8:-2]), v) for k, v in vocabulary_map.items() if k.startswith("<|visual token")
        )
        self.visual_ids = [v for _, v in visual]
        self.bpe2img = torch.zeros(max(self.visual_ids) + 1, dtype=torch.long)
        self.bpe2img[self.visual_ids] = torch.arange(len(self.visual_ids))
        self.ids = {
            name: vocabulary_map[name] for name in (IMAGE_START, IMAGE_WRAPPER, IMAGE, EOL, EOF, IMAGE_END)
        }

    # ---- images in ------------------------------------------------------------------------------------

    def preprocess(self, image) -> torch.Tensor:
        """A path, bytes or PIL image -> (3, H, W) normalized pixels, H and W multiples of spatial_factor."""
        img = image if isinstance(image, Image.Image) else load_image(image, max_pixels=self.max_input_pixels)
        if img.width * img.height > self.max_input_pixels:
            raise MediaError(
                f"image of {img.width}x{img.height} pixels is over the configured area of {self.max_input_pixels} pixels"
            )
        img = to_rgb(img)
        h, w = smart_resize(img.height, img.width, self.spatial_factor, self.min_pixels, self.max_pixels)
        a = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0  # (H, W, 3)
        return torch.from_numpy(((a - self.mean) / self.std).transpose(2, 0, 1).copy())

    def image_prompt_ids(self, height: int, width: int) -> list[int]:
        """Header, h * (w + 1) placeholders, end of frame, image end for an image of height x width pixels."""
        h, w = height // self.vq_factor, width // self.vq_factor
        return [*self.header(h, w), *[self.ids[IMAGE]] * (h * (w + 1)), self.ids[EOF], self.ids[IMAGE_END]]

    def header(self, h: int, w: int) -> list[int]:
        return [self.ids[IMAGE_START], *self.tokenizer.encode(f"{h}*{w}"), self.ids[IMAGE_WRAPPER]]

    def __call__(self, text=None, images=None, **unused) -> dict:
        """One prompt: bos, the images (each at its `<image>` marker, else at the start), the text."""
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = [self.preprocess(im) for im in images]
        text = text or ""
        parts = text.split(IMAGE)
        if len(parts) == 1:
            parts = [""] * len(pixels) + [text]
        if len(parts) - 1 != len(pixels):
            raise MediaError(
                f"the prompt has {len(parts) - 1} {IMAGE} marker(s) but {len(pixels)} image(s) were given"
            )
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        for i, part in enumerate(parts):
            ids += self.tokenizer.encode(part) if part else []
            if i < len(pixels):
                ids += self.image_prompt_ids(*pixels[i].shape[-2:])
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        out["pixel_values"] = None
        out["input_features"] = None
        if pixels:
            if len({p.shape for p in pixels}) > 1:
                raise MediaError("images of different sizes go in separate prompts")
            out["pixel_values"] = torch.stack(pixels)
            out["image_sizes"] = torch.tensor([list(p.shape[-2:]) for p in pixels])
        return out

    # ---- images out -----------------------------------------------------------------------------------

    def generation_grid(self, height: int, width: int) -> tuple[int, int]:
        """Codes per side for a generated image of height x width pixels; refused over image_area."""
        f = self.vq_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise MediaError(f"image size {width}x{height}: sides must be positive multiples of {f} pixels")
        if height * width > self.image_area:
            raise MediaError(
                f"image size {width}x{height} = {width * height} pixels is over the configured area of "
                f"{self.image_area} pixels"
            )
        return height // f, width // f

    def to_image(self, pixels: torch.Tensor) -> Image.Image:
        """(3, H, W) normalized pixels -> an RGB image (transformers' Emu3 postprocess)."""
        a = pixels.float().cpu().numpy().transpose(1, 2, 0) * self.std + self.mean
        return Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8))

    @classmethod
    def from_pretrained(cls, path) -> Emu3Processor:
        from ..convert.emu3 import vq_config_from_hf
        from ..convert.hf import read_config
        from ..convert.validate import read_json
        from ..errors import ConfigError

        path = Path(path)
        hf = read_config(path)
        pre = {}
        if (path / "preprocessor_config.json").is_file():
            pre = read_json(path / "preprocessor_config.json", error=ConfigError)
        keys = ("spatial_factor", "min_pixels", "max_pixels", "image_mean", "image_std", "image_area")
        kw = {k: pre[k] for k in keys if k in pre}
        vq = vq_config_from_hf(hf.get("vq_config") or {})
        return cls(TextTokenizer.from_dir(path), hf["vocabulary_map"], vq.spatial_factor, **kw)
