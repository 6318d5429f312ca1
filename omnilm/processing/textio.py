"""Small readers every file path shares (documents, office files, video): a size-limited read and a
linear-time HTML-to-text pass. A leaf module, so documents.py, office.py and video.py can all use it
without importing each other."""

from __future__ import annotations

import os
import re
from html import unescape
from html.parser import HTMLParser

from ..errors import MediaError

SUPPORTED_KINDS = (
    "PDF, images (PNG, JPEG, GIF, WebP, BMP), audio (WAV, FLAC, OGG, MP3), "
    "video (MP4, MOV, WebM, MKV, AVI), office documents (XLSX, ODS, DOCX, ODT, PPTX, EPUB), "
    "and text (UTF-8, UTF-16 with a byte-order mark, Latin-1: plain, Markdown, CSV, JSON, HTML)"
)


def read_limited(source, max_bytes: int, what: str = "file") -> tuple[bytes, str]:
    """(bytes, display name) of a path or bytes, refusing anything over max_bytes before reading it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), f"<{what} bytes>"
    else:
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise MediaError(f"{name}: no such file")
        size = os.path.getsize(name)
        if size > max_bytes:
            raise MediaError(f"{name}: {size} bytes is over the {max_bytes}-byte limit")
        with open(name, "rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MediaError(f"{name}: {len(data)} bytes is over the {max_bytes}-byte limit")
    if not data:
        raise MediaError(f"{name}: file is empty")
    return data, name


# ---- HTML -----------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p",
    "div",
    "br",
    "li",
    "tr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "section",
    "article",
    "table",
    "ul",
    "ol",
    "pre",
    "blockquote",
    "title",
}


class _TextOnly(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0  # depth inside <script>/<style>

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "template", "noscript"):
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "template", "noscript"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    # One regex pass, linear in the input: html.parser rescans unterminated tags, comments and quoted
    # attributes from the start on every chunk (1,000,000 unterminated tags ran for minutes).
    parser = _TextOnly()
    for m in _HTML_TOKEN.finditer(html):
        text, end, tag = m.group("text"), m.group("end"), m.group("tag")
        if text is not None:
            parser.handle_data(unescape(text))
        elif tag is not None:
            parser.handle_endtag(tag.lower()) if end else parser.handle_starttag(tag.lower(), [])
    lines = (" ".join(line.split()) for line in "".join(parser.chunks).splitlines())
    return "\n".join(line for line in lines if line)


# a comment (or the rest of the file if unterminated), a tag whose attributes hold no '<' (an
# unterminated tag ends at the next '<'), other markup (<!doctype>, <?xml?>), or a run of text
_HTML_TOKEN = re.compile(
    r"<!--(?:.*?-->|.*)|<(?P<end>/?)(?P<tag>[a-zA-Z][^\s/<>]*)[^<>]*>?|<[!?/][^<>]*>?|(?P<text>[^<]+|<)",
    re.S,
)
