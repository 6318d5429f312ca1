"""OpenAI chat messages -> model inputs: content parts decoded (with limits) and the prompt rendered.

Media come inline as base64 (`data:` URIs, input_audio, file_data; a video as vLLM's video_url part, a
file part that must hold a video container). http(s) URLs are fetched only with
--allow-media-url and file:// paths read only under --allow-local-media DIR; by default neither.
The prompt follows the checkpoint: its own Jinja chat template if it has one, the built-in chat
format if processor_config.json says "chat", else the plain format `omnilm generate` uses (the
system text and the last user message, media first), so the demo answers here exactly as on the command line.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import MediaError

MAX_MEDIA_BYTES = 32 * 1024 * 1024
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*?;base64,", re.ASCII)


def b64decode(data: str, what: str, max_bytes: int = MAX_MEDIA_BYTES) -> bytes:
    if len(data) * 3 // 4 > max_bytes:
        raise MediaError(f"{what} is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64") from None


class MediaPolicy:
    def __init__(self, allow_url: bool = False, local_dir=None, max_bytes: int = MAX_MEDIA_BYTES):
        self.allow_url = allow_url
        self.local_dir = Path(local_dir).resolve() if local_dir else None
        self.max_bytes = max_bytes

    def image_bytes(self, url: str, where: str, kind: str = "image") -> bytes:
        """The bytes an image_url (or video_url) names: a data: URI, or an allowed URL or local file."""
        m = _DATA_URI.match(url)
        if m:
            return b64decode(url[m.end() :], where, self.max_bytes)
        scheme = urlparse(url).scheme
        if scheme in ("http", "https"):
            if not self.allow_url:
                raise MediaError(
                    f"{where}: {kind} URLs are not fetched (start the server with --allow-media-url)"
                )
            return self._fetch(url, where)
        if scheme == "file":
            if self.local_dir is None:
                raise MediaError(
                    f"{where}: file:// is refused (start the server with --allow-local-media DIR)"
                )
            path = Path(unquote(urlparse(url).path)).resolve()
            if not path.is_relative_to(self.local_dir) or not path.is_file():
                raise MediaError(f"{where}: {path} is not a file under {self.local_dir}")
            if path.stat().st_size > self.max_bytes:
                raise MediaError(f"{where}: {path} is over the limit of {self.max_bytes} bytes")
            return path.read_bytes()
        raise MediaError(f"{where}: expected a data:...;base64, URI")

    def _fetch(self, url: str, where: str) -> bytes:
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http(s) only, checked above)
                data = r.read(self.max_bytes + 1)
        except OSError as e:
            raise MediaError(f"{where}: cannot fetch {url}: {e}") from None
        if len(data) > self.max_bytes:
            raise MediaError(f"{where}: {url} is over the limit of {self.max_bytes} bytes")
        return data


def to_parts(messages, policy: MediaPolicy) -> list[dict]:
    """Validated OpenAI messages -> OmniLM chat messages (parts with decoded bytes)."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        parts = []
        for j, p in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
            elif p.type == "image_url":
                parts.append({"type": "image", "image": policy.image_bytes(p.image_url.url, where)})
            elif p.type == "video_url":
                from ..processing.video import video_container

                data = policy.image_bytes(p.video_url.url, where, kind="video")
                if not video_container(data[:16]):
                    raise MediaError(f"{where}: video_url holds no MP4/MOV, WebM/MKV or AVI container")
                parts.append({"type": "file", "file": data})  # documents read it: frames and sound track
            elif p.type == "input_audio":
                data = b64decode(p.input_audio.data, f"{where}.input_audio.data", policy.max_bytes)
                parts.append({"type": "audio", "audio": data})
            else:
                data = b64decode(p.file.file_data, f"{where}.file.file_data", policy.max_bytes)
                parts.append({"type": "file", "file": data})
        out.append({"role": role, "content": parts})
    return out
