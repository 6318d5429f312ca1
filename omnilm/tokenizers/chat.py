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

A checkpoint that carries its own Jinja `chat_template` (tokenizer_config.json or chat_template.jinja
beside tokenizer.json) is rendered with it instead, the way transformers' `apply_chat_template` does:
a sandboxed jinja2 environment with the same options and helpers, the rendered text tokenized with
special tokens parsed, so the ids are the same as transformers'. Two differences: a special-token
string inside user text stays ordinary text (never a control or placeholder id; such text reaches
the template as a stand-in), and the loss mask comes from `{% generation %}` blocks when the template
has them, else from the assistant messages' text and the special token closing each.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, MediaError
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
    messages, tokenizer: TextTokenizer, add_generation_prompt: bool = False, load_file=None, template=None
):
    """(ids, loss_mask, media): media lists ("image" | "audio", source) in the order of their markers.

    template: a ChatTemplate or Jinja source; None: the tokenizer's own (find_chat_template), else the
    built-in Llama-3-like format above."""
    if template is None:
        template = find_chat_template(tokenizer)
    if template is not None:
        if not isinstance(template, ChatTemplate):
            template = ChatTemplate(template)
        return template.encode(messages, tokenizer, add_generation_prompt, load_file=load_file)
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


# ---- the checkpoint's own Jinja template ----------------------------------------------------------

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# User text is kept in private-use characters while the template runs, so a special-token string typed
# by a user can be told apart from one the template wrote: U+F0000 opens, U+F0001 + n names string n.
_GUARD_OPEN, _GUARD_BASE = "\U000f0000", 0xF0001
_GUARD_RE = re.compile("\U000f0000([\U000f0001-\U000ffffd])")


def load_chat_template(model_dir) -> str | None:
    """The Jinja chat template a checkpoint directory carries: chat_template.jinja, else the
    `chat_template` of tokenizer_config.json (a string, or a list of named templates: "default")."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text()
    cfg_file = model_dir / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        template = json.loads(cfg_file.read_text()).get("chat_template")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{cfg_file}: chat_template is a list without a 'default' entry")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{cfg_file}: chat_template must be a string, got {type(template).__name__}")
    return template


def find_chat_template(tokenizer: TextTokenizer):
    """The ChatTemplate stored beside the tokenizer's files, or None (the built-in format applies)."""
    own = getattr(tokenizer, "chat_template", None)
    if own is not None:
        return own
    return _template_beside(str(tokenizer.source))


@lru_cache(maxsize=32)
def _template_beside(source: str):  # once per tokenizer file, not a stat per conversation
    path = Path(source)
    return _template_in(str(path.parent)) if path.is_file() else None


@lru_cache(maxsize=32)
def _template_in(model_dir: str):
    text = load_chat_template(model_dir)
    return ChatTemplate(text) if text else None


def _environment():
    """transformers' chat-template environment: sandboxed, trim/lstrip blocks, loop controls, its helpers."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the text a model learns (the loss mask)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            # The spans are found again in the output by these sentinels (removed before tokenizing).
            return "\U000ffffe" + caller() + "\U000fffff"

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A checkpoint's Jinja chat template: `render` gives transformers' text, `encode` its ids."""

    def __init__(self, source: str):
        import jinja2

        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"the chat template does not parse: {e}") from None

    def render(self, messages, add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, as `apply_chat_template(..., tokenize=False)` gives it."""
        text = self._render(_plain(messages), add_generation_prompt, kwargs)
        return text.replace("\U000ffffe", "").replace("\U000fffff", "")

    def _render(self, messages, add_generation_prompt, kwargs) -> str:
        import jinja2

        try:
            # tools/documents are passed as None like transformers does, so `is none` tests agree
            kwargs = {"tools": None, "documents": None, **kwargs}
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except jinja2.TemplateError as e:  # includes raise_exception() and sandbox refusals
            raise ConfigError(f"the chat template refused the conversation: {e}") from None

    def encode(
        self, messages, tokenizer: TextTokenizer, add_generation_prompt=False, load_file=None, **kwargs
    ):
        """(ids, loss_mask, media) like render_chat_with_media, through this template.

        Media parts stay parts for the template (type "image"/"audio"), which writes the tokenizer's
        placeholder token for each; file parts are first expanded into their text/image/audio parts.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        specials, any_special, longest_first = _added_tokens(tokenizer)
        guarded = _Guards(any_special)
        media: list = []
        msgs = [_template_message(m, i, media, guarded, load_file) for i, m in enumerate(messages)]
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok_id = getattr(tokenizer, name + "_id", None)
            if tok_id is not None and name not in kwargs:
                kwargs[name] = tokenizer.id_to_token(tok_id)
        text = self._render(msgs, add_generation_prompt, kwargs)
        if "\U000ffffe" not in text:  # no {% generation %} blocks: learn the assistant messages' text
            text = _mark_assistant(text, msgs, specials)
        ids, mask = _tokenize(text, tokenizer, specials, guarded, longest_first)
        for kind, marker in (("image", tokenizer.image_token_id), ("audio", tokenizer.audio_token_id)):
            want = sum(k == kind for k, _ in media)
            if ids.count(marker) != want if marker is not None else want:
                raise MediaError(
                    f"the chat template wrote {ids.count(marker) if marker is not None else 0} {kind} "
                    f"placeholder(s) for {want} {kind} part(s); it must write one per part"
                )
        return ids, mask, media


def _plain(x):
    """Only plain data reaches a template: dicts, lists, strings, numbers (media sources become None)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return None


class _Guards(list):
    """The user texts replaced by stand-ins, and the pattern of the special-token strings."""

    def __init__(self, special_re: re.Pattern | None):
        super().__init__()
        self.special_re = special_re


def _guard(text: str, guarded: _Guards) -> str:
    """User text as the template sees it: itself, unless it holds a special-token string; then a
    stand-in (outer whitespace kept outside, so `| trim` acts as on the text) that is tokenized as
    plain text after rendering. Only such text can render differently from transformers."""
    core = text.strip()
    if not core or guarded.special_re is None or not guarded.special_re.search(text):
        return text
    guarded.append(core)
    start = text.index(core)
    return text[:start] + _GUARD_OPEN + chr(_GUARD_BASE + len(guarded) - 1) + text[start + len(core) :]


def _template_message(message, i, media, guarded, load_file) -> dict:
    """A message as the template sees it: user text guarded, media parts typed, file parts expanded."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ConfigError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.80}")
    out = {k: _plain(v) for k, v in message.items() if k != "content"}
    content = message["content"]
    if isinstance(content, str) or content is None:
        out["content"] = _guard(content, guarded) if content else content
        return out
    if not isinstance(content, (list, tuple)):
        raise ConfigError(f"messages[{i}].content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _guard(str(part.get("text", "")), guarded)})
        elif kind in ("image", "audio"):
            media.append((kind, next((part[k] for k in MEDIA_KEYS[kind] if k in part), None)))
            parts.append({"type": kind})
        elif kind == "file":
            source = next((part[k] for k in MEDIA_KEYS["file"] if k in part), None)
            if source is None:
                raise ConfigError(f"messages[{i}].content[{j}] of type 'file' needs a 'file' key")
            if load_file is None:
                from ..processing.documents import load_document as load_file
            for sub_kind, value in load_file(source):
                if sub_kind == "text":
                    parts.append({"type": "text", "text": _guard(value + "\n\n", guarded)})
                else:
                    media.append((sub_kind, value))
                    parts.append({"type": sub_kind})
        else:
            raise ConfigError(
                f"messages[{i}].content[{j}] has unknown type {kind!r}; expected text, image, audio or file"
            )
    out["content"] = parts
    return out


def _mark_assistant(text: str, msgs, specials) -> str:
    """Wrap each assistant message's guarded text, and the special token right after it, as learned."""
    pos = 0
    for m in msgs:
        content = m.get("content")
        pieces = [content] if isinstance(content, str) else []
        if isinstance(content, list):
            pieces = [p["text"] for p in content if p.get("type") == "text"]
        for piece in pieces:
            piece = piece.strip() if piece else piece
            at = text.find(piece, pos) if piece else -1
            if at < 0:
                continue
            end = at + len(piece)
            if m.get("role") == "assistant":
                closing = next((s for s in specials if text.startswith(s, end)), "")
                end += len(closing)
                text = text[:at] + "\U000ffffe" + text[at:end] + "\U000fffff" + text[end:]
                end += 2
            pos = end
    return text


def _added_tokens(tokenizer: TextTokenizer):
    """(added-token string -> id, a pattern finding any of them, one matching the longest first),
    kept on the tokenizer until its vocabulary grows: rebuilt for every conversation they were half
    of a short chat's rendering (a Llama-3 vocabulary has 256 added tokens)."""
    size = tokenizer.vocab_size
    cached = getattr(tokenizer, "_chat_specials", None)
    if cached is None or cached[0] != size:
        specials = {t.content: i for i, t in tokenizer._tok.get_added_tokens_decoder().items()}
        pattern = lambda order: re.compile("|".join(map(re.escape, order))) if specials else None  # noqa: E731
        cached = (size, specials, pattern(specials), pattern(sorted(specials, key=len, reverse=True)))
        tokenizer._chat_specials = cached
    return cached[1:]


def _tokenize(text: str, tokenizer: TextTokenizer, specials: dict[str, int], guarded: list[str], special_re):
    """Ids of rendered text: special-token strings the template wrote become their ids; guarded user
    text is ordinary text. Returns (ids, loss_mask) with 1 on tokens inside learned spans."""
    # Undo the guards: the plain text, per character whether it is learned, and the user-text spans.
    pieces, learn, user_spans, inside, pos, length = [], [], [], False, 0, 0

    def put(chunk):
        nonlocal length
        pieces.append(chunk)
        learn.extend([inside] * len(chunk))
        length += len(chunk)

    for m in re.finditer("[\U000ffffe\U000fffff]|" + _GUARD_RE.pattern, text):
        put(text[pos : m.start()])
        if m.group(1) is None:  # a learned span opens or closes
            inside = m.group() == "\U000ffffe"
        else:
            user = guarded[ord(m.group(1)) - _GUARD_BASE]
            user_spans.append((length, length + len(user)))
            put(user)
        pos = m.end()
    put(text[pos:])
    plain = "".join(pieces)

    ids, mask = [], []

    def encode_text(start, end):
        if start >= end:
            return
        tok = tokenizer._tok
        tok.encode_special_tokens = True  # only the split below decides what is special
        try:
            enc = tok.encode(plain[start:end], add_special_tokens=False)
        finally:
            tok.encode_special_tokens = False
        ids.extend(enc.ids)
        mask.extend(int(learn[start + min(a, end - start - 1)]) for a, _ in enc.offsets)

    pos = 0
    if special_re is not None:  # the special-token strings, longest first
        for m in special_re.finditer(plain):
            if any(a <= m.start() < b for a, b in user_spans):
                continue
            encode_text(pos, m.start())
            ids.append(specials[m.group()])
            mask.append(int(learn[m.start()]))
            pos = m.end()
    encode_text(pos, len(plain))
    forbidden = {tokenizer.image_token_id, tokenizer.audio_token_id} - {None}
    for a, b in user_spans:  # user text can never hold a placeholder id
        if forbidden.intersection(tokenizer.encode(plain[a:b])):
            raise ConfigError(f"tokenizer {tokenizer.source} encodes plain text into a placeholder id")
    return ids, mask
