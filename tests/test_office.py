"""Office documents, e-books and the text fallback: real files written with the same libraries come
out as parts in reading order; malformed zips and bombs are refused as MediaError."""

import codecs
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from omnilm.errors import MediaError
from omnilm.processing.documents import load_document, sniff_kind


def _png(colour, size=(8, 6)):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, "PNG")
    return b.getvalue()


def make_xlsx() -> bytes:
    import xlsxwriter  # writes formulas with their cached results, as Excel does

    b = io.BytesIO()
    wb = xlsxwriter.Workbook(b, {"in_memory": True})
    ws = wb.add_worksheet("Invoice")
    ws.write_row(0, 0, ["item", "qty", "price"])
    ws.write_row(1, 0, ["bolts", 4, 0.25])
    ws.write_row(2, 0, ["nuts", 10, 0.1])
    ws.write(3, 0, "total")
    ws.write_formula(3, 2, "=B2*C2+B3*C3", None, 2)
    wb.add_worksheet("Notes").write(0, 0, "paid")
    wb.close()
    return b.getvalue()


def make_docx(n_images=1) -> bytes:
    import docx
    from docx.shared import Inches

    d = docx.Document()
    d.add_heading("Report", 1)
    d.add_paragraph("before the picture")
    p = d.add_paragraph("inline: ")
    for _ in range(n_images):
        p.add_run().add_picture(io.BytesIO(_png((200, 30, 30))), width=Inches(0.5))
    p.add_run(" after")
    t = d.add_table(rows=2, cols=2)
    for (r, c), v in zip([(0, 0), (0, 1), (1, 0), (1, 1)], "ab12"):
        t.cell(r, c).text = v
    d.add_paragraph("the end")
    b = io.BytesIO()
    d.save(b)
    return b.getvalue()


def make_pptx() -> bytes:
    from pptx import Presentation
    from pptx.util import Inches

    prs = Presentation()
    s = prs.slides.add_slide(prs.slide_layouts[1])
    s.shapes.title.text = "First"
    s.placeholders[1].text = "point one"
    s = prs.slides.add_slide(prs.slide_layouts[5])
    s.shapes.title.text = "Second"
    tb = s.shapes.add_textbox(Inches(1), Inches(4), Inches(3), Inches(1))  # added first, drawn lower
    tb.text_frame.text = "below the picture"
    s.shapes.add_picture(io.BytesIO(_png((30, 200, 30))), Inches(1), Inches(2), Inches(1))
    b = io.BytesIO()
    prs.save(b)
    return b.getvalue()


def make_epub() -> bytes:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("id1")
    book.set_title("T")
    book.set_language("en")
    chapters = []
    for i, (title, body) in enumerate([("Chapter one", "It began."), ("Chapter two", "It ended.")]):
        c = epub.EpubHtml(title=title, file_name=f"c{i}.xhtml")
        c.content = f"<h1>{title}</h1><p>{body}</p>"
        book.add_item(c)
        chapters.append(c)
    book.toc = tuple(chapters)
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = chapters[::-1]  # spine order, not file order, is reading order
    b = io.BytesIO()
    epub.write_epub(b, book)
    return b.getvalue()


def make_ods() -> bytes:
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import Table, TableCell, TableRow
    from odf.text import P

    doc = OpenDocumentSpreadsheet()
    t = Table(name="Sheet A")
    for row in (["item", "qty"], ["bolts", 4], ["total", ("=[.B2]*2", 8)]):
        tr = TableRow()
        for v in row:
            if isinstance(v, tuple):  # a formula with its cached value
                c = TableCell(valuetype="float", value=v[1], formula="of:" + v[0])
                c.addElement(P(text=str(v[1])))
            elif isinstance(v, int):
                c = TableCell(valuetype="float", value=v)
                c.addElement(P(text=str(v)))
            else:
                c = TableCell(valuetype="string")
                c.addElement(P(text=v))
            tr.addElement(c)
        t.addElement(tr)
    doc.spreadsheet.addElement(t)
    b = io.BytesIO()
    doc.save(b)
    return b.getvalue()


def make_odt() -> bytes:
    from odf.draw import Frame
    from odf.draw import Image as DrawImage
    from odf.opendocument import OpenDocumentText
    from odf.text import H, P

    doc = OpenDocumentText()
    doc.text.addElement(H(outlinelevel=1, text="Title"))
    doc.text.addElement(P(text="first"))
    href = doc.addPicture("Pictures/red.png", "image/png", _png((200, 30, 30)))
    p = P()
    f = Frame(width="1cm", height="1cm", anchortype="as-char")
    f.addElement(DrawImage(href=href))
    p.addElement(f)
    doc.text.addElement(p)
    doc.text.addElement(P(text="last"))
    b = io.BytesIO()
    doc.save(b)
    return b.getvalue()


def _red(img, colour=(200, 30, 30)):
    return np.abs(np.asarray(img, np.float32).mean((0, 1)) - colour).max() < 5


def test_spreadsheets_are_tables_with_cached_formula_values():
    data = make_xlsx()
    assert sniff_kind(data, "upload.bin") == "xlsx"  # by the part names, not the extension
    [(kind, text)] = load_document(data)
    assert kind == "text"
    assert text.splitlines() == [
        "Sheet: Invoice",
        "item | qty | price",
        "bolts | 4 | 0.25",
        "nuts | 10 | 0.1",
        "total |  | 2",
        "Sheet: Notes",
        "paid",
    ]
    assert sniff_kind(make_ods()) == "ods"
    assert load_document(make_ods()) == [("text", "Sheet: Sheet A\nitem | qty\nbolts | 4\ntotal | 8")]


def test_word_documents_keep_images_at_their_places():
    parts = load_document(make_docx())
    assert [k for k, _ in parts] == ["text", "image", "text"]
    assert parts[0][1] == "Report\nbefore the picture\ninline: "
    assert _red(parts[1][1])
    assert parts[2][1] == " after\na | b\n1 | 2\nthe end"
    parts = load_document(make_odt())
    assert [k for k, _ in parts] == ["text", "image", "text"]
    assert parts[0][1] == "Title\nfirst" and parts[2][1] == "last" and _red(parts[1][1])


def test_slides_in_order_and_chapters_in_spine_order():
    parts = load_document(make_pptx())
    assert [k for k, _ in parts] == ["text", "image", "text"]
    assert parts[0][1] == "Slide 1: First\npoint one\nSlide 2: Second"
    assert _red(parts[1][1], (30, 200, 30)) and parts[2][1] == "below the picture"
    assert load_document(make_epub()) == [("text", "Chapter two\nIt ended.\nChapter one\nIt began.")]


def test_text_fallback_utf16_and_latin1():
    csv = "name,city\nJosé,Zürich\n"
    for bom, enc in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        data = bom + csv.encode(enc)
        assert data[:2] in (b"\xff\xfe", b"\xfe\xff")  # FF FE once read as an MPEG audio frame sync
        assert sniff_kind(data, "cities.csv") == "csv"
        assert load_document(data) == [("text", csv)]
    assert load_document("naïve café\n".encode("latin-1")) == [("text", "naïve café\n")]
    with pytest.raises(MediaError, match="supported:"):
        load_document(bytes(range(1, 32)) * 50)  # control bytes: not Latin-1 text


def test_processor_puts_document_images_at_placeholders():
    from omnilm.demo.train import build_processor, model_config
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    cfg = model_config(tok)
    processor = build_processor(cfg, tok)
    batch = processor(text="what is after the picture?", files=[make_docx()])
    ids = batch["input_ids"][0].tolist()
    first = ids.index(cfg.image_token_id)
    assert ids.count(cfg.image_token_id) == cfg.vision.tokens_per_image
    assert tok.decode(ids[:first]).endswith("inline: ")
    assert tok.decode(ids[first:]).lstrip().startswith("after")
    assert batch["pixel_values"].shape == (1, 3, 16, 16)


# ---- malformed and hostile zips ------------------------------------------------------------------------


def _zip(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression) as z:
        for name, data in entries:
            z.writestr(name, data)
    return b.getvalue()


def _replace(doc: bytes, part: str, data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(doc)) as z:
        entries = [(n, data if n == part else z.read(n)) for n in z.namelist()]
    return _zip(entries)


def malformed_office(full: bool = True) -> dict[str, bytes]:
    """Broken office files and hostile zips (full: also the ones that take seconds to build)."""
    rng = np.random.default_rng(0)
    docs = {
        "xlsx": make_xlsx(),
        "docx": make_docx(),
        "pptx": make_pptx(),
        "epub": make_epub(),
        "ods": make_ods(),
        "odt": make_odt(),
    }
    cases = {}
    for kind, data in docs.items():
        for frac in (0.3, 0.9):
            cases[f"{kind}_cut_{frac}"] = data[: int(len(data) * frac)]
        noisy = np.frombuffer(data, np.uint8).copy()
        noisy[rng.integers(30, len(data), 40)] = rng.integers(0, 256, 40, dtype=np.uint8)
        cases[f"{kind}_noise"] = noisy.tobytes()
    cases["xlsx_bad_workbook_xml"] = _replace(docs["xlsx"], "xl/workbook.xml", b"<not xml")
    cases["xlsx_bad_sheet_xml"] = _replace(docs["xlsx"], "xl/worksheets/sheet1.xml", b"\x00\x01garbage")
    cases["docx_bad_document_xml"] = _replace(docs["docx"], "word/document.xml", b"<w:document>")
    cases["docx_bad_image"] = _replace(docs["docx"], "word/media/image1.png", b"\x89PNG\r\n\x1a\nbroken")
    cases["pptx_bad_presentation"] = _replace(docs["pptx"], "ppt/presentation.xml", b"")
    cases["epub_bad_container"] = _replace(docs["epub"], "META-INF/container.xml", b"<container/>")
    cases["ods_bad_content"] = _replace(docs["ods"], "content.xml", b"<office:document-content")
    cases["plain_zip"] = _zip([("readme.txt", b"hello")])
    cases["content_types_only"] = _zip([("[Content_Types].xml", b"<Types/>")])
    cases["workbook_name_only"] = _zip([("[Content_Types].xml", b"<Types/>"), ("xl/workbook.xml", b"")])
    cases["mimetype_unknown"] = _zip([("mimetype", b"application/x-nothing")])
    cases["empty_zip"] = _zip([])
    cases["pk_garbage"] = b"PK\x03\x04" + rng.bytes(3000)
    # bombs: a 2000x entry, a 300 MB entry, 10001 entries; refused from the central directory alone
    cases["bomb_ratio"] = _zip([("[Content_Types].xml", b""), ("word/document.xml", b" " * (40 << 20))])
    if full:
        cases["bomb_total_size"] = _zip([("[Content_Types].xml", b""), ("xl/workbook.xml", bytes(300 << 20))])
        cases["bomb_entries"] = _zip([(f"f{i}", b"") for i in range(10_001)], zipfile.ZIP_STORED)
        cases["docx_many_images"] = make_docx(n_images=70)
    # a hostile ODS: one cell repeated a million times across, a row repeated a million times down
    ods = docs["ods"]
    with zipfile.ZipFile(io.BytesIO(ods)) as z:
        content = z.read("content.xml")
    wide = content.replace(
        b'<table:table-cell office:value-type="string"',
        b'<table:table-cell table:number-columns-repeated="1000000" office:value-type="string"',
        1,
    )
    cases["ods_repeated_columns"] = _replace(ods, "content.xml", wide)
    tall = content.replace(b"<table:table-row>", b'<table:table-row table:number-rows-repeated="1000000">', 1)
    cases["ods_repeated_rows"] = _replace(ods, "content.xml", tall)
    return cases


FAST_OFFICE_CASES = ("docx_cut_0.9", "xlsx_bad_sheet_xml", "bomb_ratio", "plain_zip", "ods_repeated_rows")


def test_malformed_office_fast_subset(tmp_path):
    from tests.test_video import check_malformed

    cases = malformed_office(full=False)
    results = check_malformed({k: cases[k] for k in FAST_OFFICE_CASES}, tmp_path, ".docx")
    assert all(r[0] == "error" for r in results.values())


@pytest.mark.slow
def test_malformed_office_all(tmp_path):
    from tests.test_video import check_malformed

    cases = malformed_office()
    assert len(cases) >= 30
    check_malformed(cases, tmp_path, ".xlsx")
