"""Files in: sniff the kind by content, turn documents into an ordered list of text/image/audio parts.

`load_document(path_or_bytes)` returns parts such as
    [("text", "Invoice 42 ..."), ("image", <PIL.Image>), ("text", "... total 17")]
PDF text comes out per page in content-stream order with each embedded image at the point where the
page draws it; office documents and e-books come from office.py, videos (frames and sound) from
video.py; images and audio files are handed on (as their path or bytes) to their processors,
which apply their own limits. Limits on bytes, pages and embedded-image pixels are checked before
anything is decoded. Every failure a file can cause is a MediaError naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
import warnings
import zlib
from pathlib import Path

from ..errors import MediaError
from .textio import SUPPORTED_KINDS, html_to_text, read_limited  # noqa: F401 (re-exported)

MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_PDF_PAGES = 200
MAX_EMBEDDED_IMAGE_PIXELS = 4096 * 4096
MAX_PDF_TOTAL_PIXELS = 4 * 4096 * 4096  # all embedded images of one PDF together (~200 MB as RGB)
MAX_PDF_SECONDS = 20.0  # wall time to extract one PDF's text and images
# A text document's tokens are at most its UTF-8 bytes (byte-level BPE), so this bounds the token count
# before anything is tokenized: ~2M bytes is ~500k tokens, beyond every context served here.
MAX_TEXT_BYTES = 2 * 1024 * 1024
MAX_HTML_BYTES = 4 * 1024 * 1024  # markup in; its text out is bounded by MAX_TEXT_BYTES

OFFICE_KINDS = ("xlsx", "ods", "docx", "odt", "odp", "pptx", "epub")
TEXT_EXTENSIONS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".csv": "csv",
    ".json": "json",
    ".html": "html",
    ".htm": "html",
}


# ---- sniffing -------------------------------------------------------------------------------------


def sniff_kind(data: bytes, name: str = "") -> str:
    """The kind of a file from its bytes: pdf | image | audio | video | xlsx | ods | docx | odt | odp |
    pptx | epub | text | markdown | csv | json | html.

    A byte-order mark, then magic bytes decide binary kinds (zip containers by the part names inside);
    the extension only picks the flavour of a file that is already known to be text. Raises MediaError
    for anything else.
    """
    head = data[:16]
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "pdf"
    # A byte-order mark decides before any magic: UTF-16 LE text starts FF FE, which reads as an MPEG
    # audio frame sync below.
    bom_text = _decode_text(data) if data.startswith(_BOMS) else None
    if bom_text is not None:
        return _text_flavour(bom_text, name)
    from .video import video_container

    if video_container(head):
        return "video"
    if head.startswith(b"PK\x03\x04"):
        from .office import sniff_zip

        return sniff_zip(data, name)
    if (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head[:6] in (b"GIF87a", b"GIF89a")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or head[:2] == b"BM"
    ):
        return "image"
    if (
        (head[:4] == b"RIFF" and head[8:12] == b"WAVE")
        or head[:4] in (b"fLaC", b"OggS")
        or head[:3] == b"ID3"
        or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # MPEG audio frame sync
    ):
        return "audio"
    text = _decode_text(data)
    if text is None:
        raise MediaError(
            f"{name or 'file'}: unsupported file kind (not a known binary format and not text); supported: {SUPPORTED_KINDS}"
        )
    return _text_flavour(text, name)


def _text_flavour(text: str, name: str) -> str:
    flavour = TEXT_EXTENSIONS.get(Path(name).suffix.lower()) if name else None
    if flavour:
        return flavour
    start = text.lstrip()[:64].lower()
    if start.startswith("<!doctype html") or start.startswith("<html"):
        return "html"
    if start[:1] in ("{", "["):
        try:
            json.loads(text)
            return "json"
        except (ValueError, RecursionError):  # RecursionError: nested beyond the parser's stack
            pass
    return "text"


_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
# C0 controls other than tab, newline, vertical tab, form feed, carriage return and escape, DEL, and the
# C1 block: text has (almost) none of them, binary data has many
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


def _decode_text(data: bytes) -> str | None:
    """Text of UTF-8 (BOM optional), UTF-16 with a BOM, or Latin-1, if at most 1 character in 1000 is a
    control character (Latin-1 decodes every byte string; control bytes are valid UTF-8); else None."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")  # the BOM picks the byte order and is dropped
        except UnicodeDecodeError:
            return None
    elif b"\x00" in data:  # NUL bytes: binary, even when they happen to be valid UTF-8
        return None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    sample = text[:65536]
    if len(_CONTROL.findall(sample)) * 1000 > len(sample):
        return None
    return text


# ---- entry point ----------------------------------------------------------------------------------


def load_document(
    source,
    *,
    max_bytes: int = MAX_DOCUMENT_BYTES,
    max_pages: int = MAX_PDF_PAGES,
    max_image_pixels: int = MAX_EMBEDDED_IMAGE_PIXELS,
    password: str | None = None,
    video: dict | None = None,
) -> list[tuple[str, object]]:
    """Parts [("text", str) | ("image", PIL.Image | path | bytes) | ("audio", path | bytes)] of a file.

    video: options for load_video (fps, max_frames, audio_chunk_seconds, audio_rate)."""
    data, name = read_limited(source, max_bytes, "document")
    kind = sniff_kind(data, name)
    # Images and audio are decoded (with their own limits) by their processors, from the original source.
    passthrough = data if isinstance(source, (bytes, bytearray, memoryview)) else name
    if kind == "image":
        return [("image", passthrough)]
    if kind == "audio":
        return [("audio", passthrough)]
    if kind == "pdf":
        return load_pdf(data, name, max_pages=max_pages, max_image_pixels=max_image_pixels, password=password)
    if kind == "video":
        from .video import load_video

        return load_video(None, data=data, name=name, **(video or {}))
    if kind in OFFICE_KINDS:
        from .office import load_office

        return load_office(data, name, kind, max_image_pixels=max_image_pixels)
    limit = MAX_HTML_BYTES if kind == "html" else MAX_TEXT_BYTES
    if len(data) > limit:
        raise MediaError(
            f"{name}: {len(data)} bytes of {kind} is over the {limit}-byte limit for a text document "
            f"(at most one token per byte)"
        )
    text = _decode_text(data)
    if kind == "html":
        text = html_to_text(text)
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise MediaError(f"{name}: the text of this HTML is over the {MAX_TEXT_BYTES}-byte limit")
    return [("text", text)] if text.strip() else []


# ---- PDF ------------------------------------------------------------------------------------------


def load_pdf(
    data: bytes,
    name: str = "<pdf>",
    *,
    max_pages: int = MAX_PDF_PAGES,
    max_image_pixels: int = MAX_EMBEDDED_IMAGE_PIXELS,
    password: str | None = None,
) -> list[tuple[str, object]]:
    """Text and embedded images of a PDF, page by page, each image where the page draws it."""
    # pypdf logs and warns about every oddity it repairs; the MediaError (if any) says what failed
    with warnings.catch_warnings(), _quiet_logger("pypdf"):
        warnings.simplefilter("ignore")
        return _load_pdf(data, name, max_pages, max_image_pixels, password)


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_pdf(data, name, max_pages, max_image_pixels, password):
    from pypdf import PdfReader

    # A cut-off download loses the trailer; pypdf would quietly rebuild what it can, so refuse here.
    if b"%%EOF" not in data[-4096:]:
        raise MediaError(f"{name}: truncated PDF (no %%EOF trailer at the end of the file)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are encrypted with an empty user password (owner restrictions only).
            try:
                ok = reader.decrypt(password or "")
            except Exception as e:
                raise MediaError(f"{name}: encrypted PDF that cannot be decrypted here ({e})") from None
            if not ok:
                hint = "wrong password" if password else "no password given"
                raise MediaError(f"{name}: encrypted PDF ({hint})")
        n_pages = len(reader.pages)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{name}: corrupt PDF ({type(e).__name__}: {e})") from None
    if n_pages > max_pages:
        raise MediaError(f"{name}: {n_pages} pages is over the {max_pages}-page limit")
    if n_pages == 0:
        raise MediaError(f"{name}: PDF has no pages")

    total = 0  # all pages' image headers first: a document of many large images is refused undecoded
    for index in range(n_pages):
        try:
            total += _declared_pixels(reader.pages[index], max_image_pixels)
        except MediaError as e:
            raise MediaError(f"{name}: page {index + 1}: {e}") from None
        except Exception as e:
            raise MediaError(f"{name}: corrupt PDF page {index + 1} ({type(e).__name__}: {e})") from None
    if total > MAX_PDF_TOTAL_PIXELS:
        raise MediaError(
            f"{name}: embedded images declare {total} pixels in total, over the "
            f"{MAX_PDF_TOTAL_PIXELS}-pixel limit for one document"
        )
    parts: list[tuple[str, object]] = []
    budget = {"pixels": MAX_PDF_TOTAL_PIXELS, "deadline": time.monotonic() + MAX_PDF_SECONDS}
    text_bytes = 0
    for index in range(n_pages):
        if time.monotonic() > budget["deadline"]:
            raise MediaError(
                f"{name}: extraction passed the {MAX_PDF_SECONDS:g}-second limit at page {index + 1}"
            )
        try:
            page_parts = _page_parts(reader.pages[index], max_image_pixels, budget)
            text_bytes += sum(len(v.encode("utf-8")) for k, v in page_parts if k == "text")
            if text_bytes > MAX_TEXT_BYTES:
                raise MediaError(f"its text is over the {MAX_TEXT_BYTES}-byte limit")
        except MediaError as e:
            raise MediaError(f"{name}: page {index + 1}: {e}") from None
        except Exception as e:
            raise MediaError(f"{name}: corrupt PDF page {index + 1} ({type(e).__name__}: {e})") from None
        if parts and page_parts:
            page_parts[0] = _join_first(page_parts[0])
        parts.extend(page_parts)
    return _merge_text(parts)


def _join_first(part):
    # Pages are separated by a blank line in the text flow.
    return ("text", "\n\n" + part[1]) if part[0] == "text" else part


def _image_xobjects(page) -> dict[str, object]:
    """Name -> image XObject stream in the page's resources (form XObjects are searched one level)."""
    out = {}
    resources = page.get("/Resources")
    resources = resources.get_object() if resources is not None else {}
    xobjects = resources.get("/XObject")
    if xobjects is None:
        return out
    for key, ref in xobjects.get_object().items():
        obj = ref.get_object()
        if obj.get("/Subtype") == "/Image":
            out[str(key)] = obj
    return out


def _declared_pixels(page, max_image_pixels: int) -> int:
    total = 0
    for key, obj in _image_xobjects(page).items():
        w, h = max(int(obj.get("/Width", 0)), 0), max(int(obj.get("/Height", 0)), 0)
        if w * h > max_image_pixels:
            raise MediaError(f"embedded image {key} is {w}x{h}, over the {max_image_pixels}-pixel limit")
        total += w * h
    return total


def _page_parts(page, max_image_pixels: int, budget: dict | None = None) -> list[tuple[str, object]]:
    images = _image_xobjects(page)
    # Check sizes from the XObject headers before decoding any pixels: each image, and all of the
    # document's images together (one image per page may be fine, 200 of them are not).
    budget = budget if budget is not None else {"pixels": MAX_PDF_TOTAL_PIXELS, "deadline": float("inf")}
    for key, obj in images.items():
        w, h = int(obj.get("/Width", 0)), int(obj.get("/Height", 0))
        if w * h > max_image_pixels:
            raise MediaError(f"embedded image {key} is {w}x{h}, over the {max_image_pixels}-pixel limit")
        budget["pixels"] -= max(w, 0) * max(h, 0)
        if budget["pixels"] < 0:
            raise MediaError(
                f"embedded images exceed the {MAX_PDF_TOTAL_PIXELS}-pixel limit for one document in total"
            )

    events: list[tuple[str, object]] = []

    def on_text(text, *_):
        if text:
            events.append(("text", text))

    def after_op(op, operands, *_):
        # After "Do", pypdf has flushed the text drawn before it, so this keeps the page's flow order.
        if op == b"Do" and operands and str(operands[0]) in images:
            events.append(("image_ref", str(operands[0])))

    page.extract_text(visitor_text=on_text, visitor_operand_after=after_op)

    parts: list[tuple[str, object]] = []
    placed = set()
    for kind, value in events:
        if kind == "image_ref":
            if value in placed:  # the same XObject drawn twice is one image for the model
                continue
            placed.add(value)
            parts.append(("image", _decode_image(images[value], value)))
            if time.monotonic() > budget["deadline"]:
                raise MediaError(f"extraction passed the {MAX_PDF_SECONDS:g}-second limit")
        else:
            parts.append((kind, value))
    # Images drawn only inside form XObjects go after the page text rather than being lost.
    for key, obj in images.items():
        if key not in placed:
            parts.append(("image", _decode_image(obj, key)))
    return _merge_text(parts)


def _decode_image(obj, key: str):
    try:
        return obj.decode_as_image()
    except Exception as e:
        raise MediaError(f"embedded image {key} cannot be decoded ({type(e).__name__}: {e})") from None


def _merge_text(parts):
    out = []
    for kind, value in parts:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + value)
        else:
            out.append((kind, value))
    out = [(k, v.strip("\n") if k == "text" else v) for k, v in out]
    return [(k, v) for k, v in out if k != "text" or v.strip()]


# ---- a small PDF writer (tests and the demo generate documents; no reportlab needed) --------------


def build_pdf(pages, page_size=(612, 792), font_size=12, image_size=96) -> bytes:
    """A PDF whose pages hold the given items top to bottom.

    `pages` is a list of pages, each a list of ("text", str) or ("image", PIL.Image) items. Text uses
    the standard Helvetica font (one line per item, WinAnsi characters); images are stored as
    Flate-compressed RGB and drawn `image_size` points wide.
    """
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)  # object numbers start at 1

    catalog = add(b"")  # filled in below, once the page tree exists
    pages_obj = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    page_ids = []
    width, height = page_size
    for items in pages:
        xobjects, ops = [], []
        y = height - 72
        for kind, value in items:
            if kind == "text":
                y -= font_size * 1.5
                ops.append(b"BT /F1 %d Tf 72 %.1f Td (%s) Tj ET" % (font_size, y, _pdf_string(value)))
            elif kind == "image":
                img = value.convert("RGB")
                stream = zlib.compress(img.tobytes())
                num = add(
                    b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB "
                    b"/BitsPerComponent 8 /Filter /FlateDecode /Length %d >>\nstream\n%s\nendstream"
                    % (img.width, img.height, len(stream), stream)
                )
                name = b"Im%d" % len(xobjects)
                xobjects.append(b"/%s %d 0 R" % (name, num))
                draw_h = image_size * img.height / img.width
                y -= draw_h + 6
                ops.append(b"q %d 0 0 %.1f 72 %.1f cm /%s Do Q" % (image_size, draw_h, y, name))
            else:
                raise ValueError(f"build_pdf: unknown item kind {kind!r}")
        content = b"\n".join(ops)
        content_id = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
        resources = b"<< /Font << /F1 %d 0 R >> /XObject << %s >> >>" % (font, b" ".join(xobjects))
        page_ids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %d %d] /Resources %s /Contents %d 0 R >>"
                % (pages_obj, width, height, resources, content_id)
            )
        )
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_obj
    kids = b" ".join(b"%d 0 R" % p for p in page_ids)
    objects[pages_obj - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        catalog,
        xref,
    )
    return bytes(out)


def _pdf_string(text: str) -> bytes:
    raw = text.encode("cp1252", errors="replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
