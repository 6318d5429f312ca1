"""Office documents in: spreadsheets as text tables, word-processor and slide text in reading order with
their images at their places, e-book chapters in spine order.

    XLSX / ODS   "Sheet: Invoices\\nitem | qty | price\\nbolts | 4 | 0.25\\n..." (formulas as cached values)
    DOCX / ODT   paragraphs and tables in body order; each inline image where its paragraph holds it
    PPTX / ODP   "Slide 1: <title>", then the slide's text and pictures top to bottom
    EPUB         chapters in spine order as text

These are zip containers. The kind is sniffed from the part names inside (not the extension), and the
archive's declared sizes are checked before anything is extracted: entry count, total uncompressed
size and compression ratio (zipfile never inflates past a member's declared size, so the declared
sizes bound the work). Parsing uses openpyxl, python-docx, python-pptx, odfpy and ebooklib.
"""

from __future__ import annotations

import io
import zipfile

from ..errors import MediaError

MAX_ZIP_ENTRIES = 10_000
MAX_UNCOMPRESSED_BYTES = 256 * 1024 * 1024
MAX_COMPRESSION_RATIO = 200  # XML compresses ~10-30x; a 1000x entry is a bomb
MAX_XML_PART_BYTES = 32 * 1024 * 1024  # parsed into a DOM (5-10x its size in memory) by the libraries
RATIO_CHECK_MIN_BYTES = 1024 * 1024  # tiny entries may compress absurdly well (runs of spaces)
MAX_CELLS = 200_000  # cells read from all sheets together
MAX_COLUMNS = 1_000  # per row, also what an ODS "repeat this cell n times" may expand to
MAX_IMAGES = 64  # embedded images per document
MAX_SLIDES = 1_000
MAX_CHAPTERS = 2_000

_ODF_MIMETYPES = {
    "application/vnd.oasis.opendocument.spreadsheet": "ods",
    "application/vnd.oasis.opendocument.text": "odt",
    "application/vnd.oasis.opendocument.presentation": "odp",
}


# ---- sniffing and limits ------------------------------------------------------------------------------


def sniff_zip(data: bytes, name: str) -> str:
    """xlsx | docx | pptx | ods | odt | odp | epub from the part names of a zip, checked for bombs."""
    zf = open_zip(data, name)
    names = set(zf.namelist())
    if "[Content_Types].xml" in names:
        for part, kind in (("xl/workbook.xml", "xlsx"), ("word/document.xml", "docx")):
            if part in names:
                return kind
        if "ppt/presentation.xml" in names:
            return "pptx"
    if "mimetype" in names:
        mimetype = zf.read("mimetype")[:100].decode("ascii", "replace").strip()
        if mimetype == "application/epub+zip":
            return "epub"
        if mimetype in _ODF_MIMETYPES:
            return _ODF_MIMETYPES[mimetype]
    from .textio import SUPPORTED_KINDS

    raise MediaError(
        f"{name}: a zip archive that is not an office document or e-book; supported: {SUPPORTED_KINDS}"
    )


def open_zip(data: bytes, name: str) -> zipfile.ZipFile:
    """A ZipFile over the bytes after the central directory's entry count, sizes and ratios pass."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise MediaError(f"{name}: corrupt or truncated zip container ({e})") from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise MediaError(f"{name}: {len(infos)} zip entries is over the limit of {MAX_ZIP_ENTRIES}")
    total = sum(i.file_size for i in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise MediaError(
            f"{name}: {total} bytes uncompressed is over the {MAX_UNCOMPRESSED_BYTES}-byte limit (zip bomb?)"
        )
    for i in infos:
        if i.file_size > RATIO_CHECK_MIN_BYTES and i.file_size > MAX_COMPRESSION_RATIO * max(
            1, i.compress_size
        ):
            raise MediaError(
                f"{name}: entry {i.filename!r} expands {i.file_size / max(1, i.compress_size):.0f}x, "
                f"over the {MAX_COMPRESSION_RATIO}x limit (zip bomb?)"
            )
        if i.file_size > MAX_XML_PART_BYTES and i.filename.lower().endswith(
            (".xml", ".xhtml", ".html", ".htm")
        ):
            raise MediaError(
                f"{name}: part {i.filename!r} is {i.file_size} bytes, over the {MAX_XML_PART_BYTES}-byte limit"
            )
        if i.flag_bits & 0x1:
            raise MediaError(f"{name}: entry {i.filename!r} is encrypted")
    return zf


def load_office(data: bytes, name: str, kind: str, max_image_pixels: int = 4096 * 4096) -> list:
    """Parts [("text", str) | ("image", PIL.Image)] of an office document or e-book of a sniffed kind."""
    open_zip(data, name)  # limits first, whatever called us
    reader = {
        "xlsx": _xlsx,
        "ods": _ods,
        "docx": _docx,
        "odt": _odf_text,
        "odp": _odf_text,
        "pptx": _pptx,
        "epub": _epub,
    }[kind]
    images = _ImageBudget(name, max_image_pixels)
    try:
        parts = reader(data, name, images)
    except MediaError:
        raise
    except Exception as e:  # the libraries raise KeyError, lxml errors, zipfile errors, ...
        raise MediaError(f"{name}: corrupt {kind.upper()} document ({type(e).__name__}: {e})") from None
    return _merge(parts)


class _ImageBudget:
    """Opens embedded images with their size checked from the header before the pixels decode."""

    def __init__(self, name: str, max_pixels: int):
        self.name, self.max_pixels, self.count = name, max_pixels, 0

    def __call__(self, blob: bytes, where: str):
        from PIL import Image

        self.count += 1
        if self.count > MAX_IMAGES:
            raise MediaError(f"{self.name}: more than {MAX_IMAGES} embedded images")
        try:
            img = Image.open(io.BytesIO(blob))
            w, h = img.size
            if w * h > self.max_pixels:
                raise MediaError(
                    f"{self.name}: image {where} is {w}x{h}, over the {self.max_pixels}-pixel limit"
                )
            img.load()
            return img.convert("RGB")
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(
                f"{self.name}: image {where} cannot be decoded ({type(e).__name__}: {e})"
            ) from None


def _merge(parts):
    out = []
    for kind, value in parts:
        if kind == "text":
            value = value.strip("\n")
            if not value.strip():
                continue
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + "\n" + value)
                continue
        out.append((kind, value))
    return out


class _CellBudget:
    def __init__(self, name: str):
        self.name, self.cells = name, 0

    def take(self, n: int, where: str):
        self.cells += n
        if self.cells > MAX_CELLS:
            raise MediaError(f"{self.name}: more than {MAX_CELLS} cells (at {where})")


def _table_text(title: str, rows: list[list[str]]) -> str:
    # trailing empty cells and rows are layout, not content
    rows = [r[: max((i + 1 for i, c in enumerate(r) if c), default=0)] for r in rows]
    while rows and not rows[-1]:
        rows.pop()
    return "\n".join([title] + [" | ".join(r) for r in rows])


def _cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ---- spreadsheets ---------------------------------------------------------------------------------------


def _xlsx(data, name, images):
    import openpyxl

    # data_only: formulas come out as the values the writing application cached
    wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    budget, parts = _CellBudget(name), []
    try:
        for ws in wb.worksheets:
            rows = []
            for r, row in enumerate(ws.iter_rows(values_only=True)):
                if len(row) > MAX_COLUMNS:
                    raise MediaError(f"{name}: sheet {ws.title!r} row {r + 1} has {len(row)} columns")
                budget.take(len(row), f"sheet {ws.title!r} row {r + 1}")
                rows.append([_cell_text(v) for v in row])
            parts.append(("text", _table_text(f"Sheet: {ws.title}", rows)))
    finally:
        wb.close()
    return parts


def _ods(data, name, images):
    from odf import table, teletype
    from odf.opendocument import load

    doc = load(io.BytesIO(data))
    budget, parts = _CellBudget(name), []
    for sheet in doc.spreadsheet.getElementsByType(table.Table):
        title = sheet.getAttribute("name")
        rows = []
        for r, row in enumerate(sheet.getElementsByType(table.TableRow)):
            cells = []
            for cell in row.getElementsByType(table.TableCell):
                repeat = int(cell.getAttribute("numbercolumnsrepeated") or 1)
                # office:value holds the cached result of a formula and the exact number of a cell
                value = cell.getAttribute("value")
                text = teletype.extractText(cell) if value is None else _cell_text(_number(value))
                if not text and repeat > MAX_COLUMNS:  # the usual "rest of the row is empty" filler
                    continue
                if len(cells) + repeat > MAX_COLUMNS:
                    raise MediaError(f"{name}: sheet {title!r} row {r + 1} has over {MAX_COLUMNS} columns")
                cells += [text] * repeat
            row_repeat = int(row.getAttribute("numberrowsrepeated") or 1)
            if not any(cells):
                row_repeat = 1  # empty filler rows: one is enough
            budget.take(len(cells) * row_repeat, f"sheet {title!r} row {r + 1}")
            rows += [cells] * row_repeat
        parts.append(("text", _table_text(f"Sheet: {title}", rows)))
    return parts


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


# ---- word processing and slides ------------------------------------------------------------------------


def _docx(data, name, images):
    import docx
    from docx.table import Table

    doc = docx.Document(io.BytesIO(data))
    parts = []
    for block in doc.iter_inner_content():  # paragraphs and tables in body order
        if isinstance(block, Table):
            rows = [[c.text.strip() for c in row.cells] for row in block.rows]
            parts.append(("text", _table_text("", rows).lstrip("\n")))
            continue
        parts += _docx_paragraph(block, doc.part, images)
    return parts


def _docx_paragraph(paragraph, part, images):
    """Text runs and inline pictures of one paragraph, in run order."""
    out, text = [], []
    for run in paragraph.iter_inner_content():
        element = getattr(run, "_element", getattr(run, "_r", None))
        blips = element.xpath(".//a:blip/@r:embed") if element is not None else []
        if hasattr(run, "text") and run.text:
            text.append(run.text)
        for rid in blips:
            if text:
                out.append(("text", "".join(text)))
                text = []
            out.append(("image", images(part.related_parts[rid].blob, rid)))
    out.append(("text", "".join(text) + "\n"))
    return out


def _pptx(data, name, images):
    from pptx import Presentation

    prs = Presentation(io.BytesIO(data))
    if len(prs.slides) > MAX_SLIDES:
        raise MediaError(f"{name}: {len(prs.slides)} slides is over the limit of {MAX_SLIDES}")
    parts = []
    for number, slide in enumerate(prs.slides, start=1):
        title_shape = slide.shapes.title
        title = title_shape.text_frame.text.strip() if title_shape is not None else ""
        parts.append(("text", f"Slide {number}: {title}" if title else f"Slide {number}"))
        shapes = [
            s for s in _flat_shapes(slide.shapes) if title_shape is None or s.shape_id != title_shape.shape_id
        ]
        shapes.sort(key=lambda s: (s.top or 0, s.left or 0))  # reading order: top to bottom, left to right
        for shape in shapes:
            if getattr(shape, "has_text_frame", False) and shape.text_frame.text.strip():
                parts.append(("text", shape.text_frame.text.strip()))
            elif getattr(shape, "has_table", False) and shape.has_table:
                rows = [[c.text.strip() for c in row.cells] for row in shape.table.rows]
                parts.append(("text", _table_text("", rows).lstrip("\n")))
            elif hasattr(shape, "image"):
                parts.append(("image", images(shape.image.blob, f"on slide {number}")))
        parts.append(("text", "\n"))
    return parts


def _flat_shapes(shapes):
    for s in shapes:
        if hasattr(s, "shapes"):  # a group
            yield from _flat_shapes(s.shapes)
        else:
            yield s


def _odf_text(data, name, images):
    """ODT and ODP: headings, paragraphs and frames' images in document order (odfpy's tree)."""
    from odf import teletype
    from odf.namespaces import DRAWNS, TEXTNS
    from odf.opendocument import load

    doc = load(io.BytesIO(data))
    parts = []
    blocks = {(TEXTNS, "p"), (TEXTNS, "h")}
    image_q, page_q = (DRAWNS, "image"), (DRAWNS, "page")
    slide = 0

    def walk(node):
        nonlocal slide
        for child in node.childNodes:
            q = getattr(child, "qname", None)
            if q == page_q:
                slide += 1
                parts.append(("text", f"Slide {slide}"))
                walk(child)
            elif q in blocks:
                # images anchored inside the paragraph come first, then its text
                walk(child)
                parts.append(("text", teletype.extractText(child) + "\n"))
            elif q == image_q:
                href = child.getAttribute("href")
                if href and href in doc.Pictures:
                    parts.append(("image", images(doc.Pictures[href][1], href)))
            elif getattr(child, "childNodes", None):
                walk(child)

    walk(doc.body)
    return parts


def _epub(data, name, images):
    import ebooklib
    from ebooklib import epub

    from .textio import html_to_text

    book = epub.read_epub(io.BytesIO(data), options={"ignore_ncx": True})
    spine = [item_id for item_id, *_ in book.spine]
    if len(spine) > MAX_CHAPTERS:
        raise MediaError(f"{name}: {len(spine)} chapters is over the limit of {MAX_CHAPTERS}")
    parts = []
    for item_id in spine:
        item = book.get_item_with_id(item_id)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        text = html_to_text(item.get_content().decode("utf-8", "replace"))
        parts.append(("text", text + "\n"))
    return parts
