"""Chat rendering: messages -> token ids and a loss mask, with a Llama-3-like template.

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

The loss mask is 1 exactly on assistant content and its <|eot_id|>, so a model learns to answer and to
stop, never to predict the prompt. Content is a string or a list of parts:
    {"type": "text", "text": ...}   {"type": "image", "image": path|bytes|PIL.Image}
    {"type": "audio", "audio": path|bytes}   {"type": "file", "file": path|bytes}
    {"type": "tokens", "ids": [...]}   (trusted ids from code, e.g. discrete image codes)
An image/audio part without a source is kept as (kind, None) in the media list; the processor fills it
from its `images=` / `audio=` arguments, in order.
Text (typed or read from a file) is encoded with special tokens not parsed; each image or audio part
becomes ONE marker id (<|image|> / <|audio|>), which the multimodal processor expands to the number of
placeholders its encoder yields. Files are read with omnilm.processing.documents.
"""

from __future__ import annotations

from ..errors import ConfigError
from .text import TextTokenizer

MEDIA_KEYS = {
    "image": ("image", "path", "url"),
    "audio": ("audio", "path", "url"),
    "file": ("file", "path", "url"),
}


def render_chat(
    messages, tokenizer: TextTokenizer, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation; media parts appear as single marker ids."""
    ids, mask, _ = render_chat_with_media(messages, tokenizer, add_generation_prompt)
    return ids, mask


def render_chat_with_media(
    messages, tokenizer: TextTokenizer, add_generation_prompt: bool = False, load_file=None
):
    """(ids, loss_mask, media): media lists ("image" | "audio", source) in the order of their markers."""
    for name in ("bos_token_id", "start_header_id", "end_header_id", "eot_token_id"):
        if getattr(tokenizer, name) is None:
            raise ConfigError(
                f"tokenizer {tokenizer.source} has no {name.removesuffix('_id')} token, needed by the chat template"
            )
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")

    ids, mask, media = [tokenizer.bos_token_id], [0], []
    newline2 = tokenizer.encode("\n\n")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.80}")
        role = message["role"]
        header = [tokenizer.start_header_id, *tokenizer.encode(str(role)), tokenizer.end_header_id, *newline2]
        body = _content_ids(message["content"], tokenizer, media, f"messages[{i}]", load_file)
        body.append(tokenizer.eot_token_id)
        ids += header + body
        learn = 1 if role == "assistant" else 0
        mask += [0] * len(header) + [learn] * len(body)
    if add_generation_prompt:
        tail = [tokenizer.start_header_id, *tokenizer.encode("assistant"), tokenizer.end_header_id, *newline2]
        ids += tail
        mask += [0] * len(tail)
    return ids, mask, media


def _content_ids(content, tokenizer: TextTokenizer, media: list, where: str, load_file) -> list[int]:
    if isinstance(content, str):
        return tokenizer.encode(content.strip())
    if not isinstance(content, (list, tuple)):
        raise ConfigError(
            f"{where}.content must be a string or a list of parts, got {type(content).__name__}"
        )
    out: list[int] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out += tokenizer.encode(part.get("text", ""))
        elif kind == "tokens":
            out += [int(t) for t in part["ids"]]
        elif kind in MEDIA_KEYS:
            source = next((part[k] for k in MEDIA_KEYS[kind] if k in part), None)
            if kind == "file":
                if source is None:
                    raise ConfigError(f"{where}.content[{j}] of type 'file' needs a 'file' key")
                out += _file_ids(source, tokenizer, media, load_file)
            else:
                out.append(_marker(tokenizer, kind))
                media.append((kind, source))
        else:
            raise ConfigError(
                f"{where}.content[{j}] has unknown type {kind!r}; expected text, image, audio, file or tokens"
            )
    return out


def _marker(tokenizer: TextTokenizer, kind: str) -> int:
    marker = tokenizer.image_token_id if kind == "image" else tokenizer.audio_token_id
    if marker is None:
        raise ConfigError(
            f"tokenizer {tokenizer.source} has no <|{kind}|> token, so it cannot take {kind} input"
        )
    return marker


def _file_ids(source, tokenizer: TextTokenizer, media: list, load_file) -> list[int]:
    if load_file is None:
        from ..processing.documents import load_document as load_file
    out: list[int] = []
    for kind, value in load_file(source):
        if kind == "text":
            out += tokenizer.encode(value)
        else:
            out.append(_marker(tokenizer, kind))
            media.append((kind, value))
    # The document ends with a blank line so the question after it starts fresh.
    return out + tokenizer.encode("\n\n")
