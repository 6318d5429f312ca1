import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from omnilm.errors import MediaError
from omnilm.processing.documents import build_pdf, html_to_text, load_document, sniff_kind


def _image(seed, h=16, w=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _same(a, b):
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))


@pytest.fixture(autouse=True)
def quiet_pypdf():
    # pypdf logs warnings while it tries to repair broken files; the tests look at the errors instead.
    logging.getLogger("pypdf").setLevel(logging.ERROR)


def test_pdf_text_and_images_in_page_flow_order(tmp_path):
    a, b, c = _image(0), _image(1, 8, 12), _image(2)
    pdf = build_pdf([
        [("text", "Invoice number 42 (paid)"), ("image", a), ("text", "Total: 17 dollars"), ("image", b)],
        [("image", c), ("text", "Second page")],
    ])  # fmt: skip
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    parts = load_document(path)
    assert [k for k, _ in parts] == ["text", "image", "text", "image", "image", "text"]
    assert parts[0][1] == "Invoice number 42 (paid)"
    assert parts[2][1] == "Total: 17 dollars"
    assert parts[5][1] == "Second page"
    assert _same(parts[1][1], a) and _same(parts[3][1], b) and _same(parts[4][1], c)


def test_pdf_written_by_pillow_gives_its_image():
    # A smooth image: Pillow stores it as JPEG, which noise would not survive.
    yy, xx = np.mgrid[0:40, 0:30]
    img = Image.fromarray(np.stack([yy * 6, xx * 8, (yy + xx) * 3], axis=-1).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PDF")
    parts = load_document(buf.getvalue())
    assert [k for k, _ in parts] == ["image"]
    assert parts[0][1].size == (30, 40)  # JPEG inside, so compare size and rough content only
    diff = np.abs(np.asarray(parts[0][1].convert("RGB"), np.float32) - np.asarray(img, np.float32)).mean()
    assert diff < 8


def test_pdf_limits_checked_before_decoding():
    pdf = build_pdf([[("text", f"page {i}")] for i in range(5)])
    with pytest.raises(MediaError, match="5 pages is over the 3-page limit"):
        load_document(pdf, max_pages=3)
    with pytest.raises(MediaError, match="over the 100-byte limit"):
        load_document(pdf, max_bytes=100)
    big = build_pdf([[("image", _image(4, 64, 64))]])
    with pytest.raises(MediaError, match="64x64, over the 1000-pixel limit"):
        load_document(big, max_image_pixels=1000)


def _encrypted(pdf: bytes, user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_encrypted():
    pdf = build_pdf([[("text", "secret digits 314")]])
    locked = _encrypted(pdf, "pw")
    with pytest.raises(MediaError, match="encrypted PDF \\(no password given\\)"):
        load_document(locked)
    with pytest.raises(MediaError, match="wrong password"):
        load_document(locked, password="nope")
    assert load_document(locked, password="pw") == [("text", "secret digits 314")]
    # Owner-only protection (empty user password) opens without asking.
    assert load_document(_encrypted(pdf, "")) == [("text", "secret digits 314")]


def test_pdf_truncated_and_corrupt():
    pdf = build_pdf([[("text", "hello"), ("image", _image(5))]])
    with pytest.raises(MediaError, match="truncated PDF"):
        load_document(pdf[: len(pdf) * 2 // 3])
    with pytest.raises(MediaError, match="corrupt PDF"):
        load_document(b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n")


def test_pdf_random_damage_only_ever_raises_media_error():
    pdf = build_pdf([[("text", "Invoice 42"), ("image", _image(6)), ("text", "Total")]])
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(60):
        damaged = bytearray(pdf)
        for pos in rng.integers(9, len(pdf) - 8, size=rng.integers(1, 20)):
            damaged[pos] = int(rng.integers(0, 256))
        try:
            load_document(bytes(damaged))
        except MediaError:
            failures += 1
    assert failures > 0  # the damage is real; anything but MediaError would have escaped above


def test_sniffing_by_content_not_extension(tmp_path):
    png = io.BytesIO()
    _image(7).save(png, format="PNG")
    fake_txt = tmp_path / "notes.txt"
    fake_txt.write_bytes(png.getvalue())
    assert load_document(fake_txt) == [("image", str(fake_txt))]

    pdf_as_png = tmp_path / "scan.png"
    pdf_as_png.write_bytes(build_pdf([[("text", "really a pdf")]]))
    assert load_document(pdf_as_png) == [("text", "really a pdf")]

    junk = tmp_path / "data.pdf"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(MediaError, match="unsupported file kind.*supported: PDF"):
        load_document(junk)

    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 28
    assert sniff_kind(wav) == "audio"
    assert sniff_kind(b"fLaC\x00\x00") == "audio" and sniff_kind(b"OggS\x00\x02") == "audio"
    assert sniff_kind(b"GIF89a....") == "image" and sniff_kind(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image"
    assert sniff_kind(b'{"a": [1, 2]}') == "json"
    assert sniff_kind(b"<!DOCTYPE html><html></html>") == "html"
    assert sniff_kind(b"a,b\n1,2\n", "table.csv") == "csv"
    with pytest.raises(MediaError):
        sniff_kind(b"plain words\x00with a NUL")


def test_text_like_files(tmp_path):
    html = tmp_path / "page.html"
    html.write_text(
        "<html><head><title>Report</title><style>p {color: red}</style><script>var x = '<p>no</p>';</script>"
        "</head><body><h1>Total &amp; tax</h1><p>The document says <b>42</b>.</p><ul><li>one</li><li>two</li></ul>"
        "</body></html>"
    )
    assert load_document(html) == [("text", "Report\nTotal & tax\nThe document says 42.\none\ntwo")]
    md = tmp_path / "notes.md"
    md.write_text("# Title\n\nSome *markdown* text.\n")
    assert load_document(md) == [("text", "# Title\n\nSome *markdown* text.\n")]
    data = {"invoice": 42, "items": ["a", "b"]}
    js = tmp_path / "d.json"
    js.write_text(json.dumps(data))
    assert json.loads(load_document(js)[0][1]) == data
    csv = tmp_path / "t.csv"
    csv.write_bytes("\ufeffdigit,count\n7,3\n".encode())
    assert load_document(csv) == [("text", "digit,count\n7,3\n")]
    with pytest.raises(MediaError, match="empty"):
        (tmp_path / "e.txt").write_bytes(b"")
        load_document(tmp_path / "e.txt")
    with pytest.raises(MediaError, match="no such file"):
        load_document(tmp_path / "missing.pdf")


def test_html_to_text_keeps_blocks_apart():
    assert html_to_text("<div>a</div><div>b<br>c</div>") == "a\nb\nc"
