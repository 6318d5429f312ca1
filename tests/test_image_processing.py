"""Image decoding (formats, EXIF, modes, budgets, corrupt input) and the processor against transformers'
SiglipImageProcessor / CLIPImageProcessor on real decoded images."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile

from omnilm.errors import ConfigError, MediaError
from omnilm.processing.image import ImageProcessor, load_image

transformers = pytest.importorskip("transformers")


def drawing(w, h, seed=0):
    """A gradient with shapes on it: every channel varies, edges exercise the resampling filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    d.ellipse([w // 4, h // 4, w // 2, h // 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    d.rectangle([3, 3, w // 3, h // 5], outline=(0, 255, 0), width=3)
    d.line([0, h - 1, w - 1, 0], fill=(255, 255, 255), width=2)
    return img


@pytest.fixture
def files(tmp_path):
    drawing(97, 61).save(tmp_path / "a.png")
    drawing(50, 120, seed=1).save(tmp_path / "b.jpg", quality=90)
    return [tmp_path / "a.png", tmp_path / "b.jpg"]


def hf_processor(kind, **kw):
    cls = transformers.SiglipImageProcessor if kind == "siglip" else transformers.CLIPImageProcessor
    return cls(**kw)


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("siglip", dict(size={"height": 32, "width": 32})),
        ("siglip", dict(size={"height": 17, "width": 23}, resample=2)),  # bilinear, non-square
        ("clip", dict(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36})),
    ],
)
def test_processor_matches_transformers(tmp_path, files, kind, kw):
    hf = hf_processor(kind, **kw)
    hf.save_pretrained(tmp_path)  # read back through preprocessor_config.json, as load_processor does
    ours = ImageProcessor.from_pretrained(tmp_path)
    images = [load_image(f) for f in files]
    ref = hf(images=images, return_tensors="pt")["pixel_values"]
    out = ours(files)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ref.std() > 0.2  # a real image, not a constant
    assert (out - ref).abs().max() <= 1e-5


def test_processor_defaults_are_siglip_224(files):
    out = ImageProcessor()(files[0])
    assert out.shape == (1, 3, 224, 224)
    assert -1.0 <= out.min() < out.max() <= 1.0


def test_processor_rejects_unsupported_config():
    with pytest.raises(ConfigError, match="do_pad"):
        ImageProcessor.from_dict({"do_pad": True, "size": {"height": 8, "width": 8}})
    with pytest.raises(ConfigError, match="resample"):
        ImageProcessor.from_dict({"resample": 9})
    with pytest.raises(ConfigError, match="size"):
        ImageProcessor.from_dict({"size": {"longest_edge": 8}})


# ---- decoding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_load_image_formats(tmp_path, fmt):
    f = tmp_path / f"x.{fmt.lower()}"
    drawing(40, 30).save(f, format=fmt)
    img = load_image(f)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.asarray(img).std() > 20
    assert load_image(f.read_bytes()).size == (40, 30)  # bytes work too


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, b = np.asarray(load_image(tmp_path / "a.gif"))[0, 0]
    assert r > 200 and b < 50


def test_exif_orientation_applied(tmp_path):
    img = drawing(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)


def test_alpha_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red, fully transparent except the top-left pixel
    a[0, 0, 3] = 255
    Image.fromarray(a).save(tmp_path / "t.png")
    out = np.asarray(load_image(tmp_path / "t.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[2, 2]) == (255, 255, 255)
    # a palette image with a transparent index
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=1)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)


def test_16_bit_gray(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (8, 8, 3)
    assert out[7, 7, 0] == round(63000 / 257) and out[0, 1, 0] == round(1000 / 257)


def test_truncated_and_non_image_give_media_error(tmp_path):
    good = io.BytesIO()
    drawing(64, 64).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(MediaError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(MediaError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(MediaError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_other_formats_refused(tmp_path):
    drawing(32, 32).save(tmp_path / "x.tiff", format="TIFF")
    with pytest.raises(MediaError, match="x.tiff"):
        load_image(tmp_path / "x.tiff")


def test_byte_budget_checked_before_reading(tmp_path, files):
    with pytest.raises(MediaError, match="bytes exceeds"):
        load_image(files[0], max_bytes=100)


def test_pixel_budget_checked_before_decoding(files, monkeypatch):
    def no_decode(self):
        raise AssertionError("pixels were decoded before the budget check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(MediaError, match="pixels exceeds"):
        load_image(files[0], max_pixels=1000)  # 97 x 61 = 5917 pixels


def test_decompression_bomb_header(tmp_path):
    """A PNG whose header claims 100000 x 100000 pixels: refused from the header alone."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(MediaError, match="bomb.png"):
        load_image(tmp_path / "bomb.png")
