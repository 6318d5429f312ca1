"""Text tokenizer: a thin wrapper over the `tokenizers` library, plus a byte-level BPE trainer.

The wrapper loads any `tokenizer.json` (OmniLM's own, a Llama-3 one, or one written by transformers'
`PreTrainedTokenizerFast.save_pretrained`) and knows the special ids OmniLM needs: bos/eos/pad, the chat
role markers and the modality markers. User text is always encoded with special tokens *not* parsed,
so typing "<|image|>" yields ordinary byte tokens; only the processor and the chat renderer insert
special ids.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..errors import ConfigError, OmniLMError

PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
IMAGE, AUDIO = "<|image|>", "<|audio|>"
IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END = (
    "<|image_start|>",
    "<|image_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
)

# Fixed low ids in trained tokenizers: the `tiny` preset assumes pad=0, bos=1, eos=2.
SPECIAL_TOKENS = [
    PAD, BOS, EOS, START_HEADER, END_HEADER, EOT,
    IMAGE, AUDIO, IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END,
]  # fmt: skip

# Llama-3's split pattern, except numbers split into single digits (digit strings are the demo's
# answers, and one token per digit makes them easy to learn for a tiny model).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    """Encode/decode text and name the special ids. Build with `from_file`, `from_dir` or `default()`."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        config = config or {}
        vocab = tokenizer.get_vocab(with_added_tokens=True)

        def find(*names):
            for name in names:
                if name and name in vocab:
                    return vocab[name]
            return None

        self.bos_token_id = find(_token_content(config.get("bos_token")), BOS, "<s>", "<|endoftext|>")
        self.eos_token_id = find(_token_content(config.get("eos_token")), EOS, "</s>", "<|endoftext|>")
        self.pad_token_id = find(_token_content(config.get("pad_token")), PAD, "<pad>")
        self.eot_token_id = find(EOT)
        self.start_header_id = find(START_HEADER)
        self.end_header_id = find(END_HEADER)
        # A LLaVA-style tokenizer names its image token "<image>"; OmniLM's is "<|image|>".
        self.image_token_id = find(config.get("image_token"), IMAGE, "<image>")
        self.audio_token_id = find(config.get("audio_token"), AUDIO, "<audio>")
        self.image_start_id, self.image_end_id = find(IMAGE_START), find(IMAGE_END)
        self.audio_start_id, self.audio_end_id = find(AUDIO_START), find(AUDIO_END)
        self.special_ids = frozenset(
            tok_id for tok_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )
        # Ids user text must never produce, whatever the vocabulary looks like.
        self._forbidden = frozenset(i for i in (self.image_token_id, self.audio_token_id) if i is not None)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: dict | None = None) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error says which field is wrong
            raise ConfigError(f"cannot read tokenizer {path}: {e}") from None
        return cls(tok, config, source=str(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> TextTokenizer:
        """Load tokenizer.json (+ tokenizer_config.json when present) from a directory."""
        path = Path(path)
        config = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            from ..convert.validate import read_json

            config = read_json(cfg_file, error=ConfigError)
        return cls.from_file(path / "tokenizer.json", config)

    @classmethod
    def default(cls) -> TextTokenizer:
        """The small byte-level BPE (vocab 2048) shipped inside the package."""
        return _default()

    # ---- encoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Encode untrusted text: special-token strings in it become ordinary byte tokens."""
        self._tok.encode_special_tokens = True
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        if self._forbidden.intersection(ids):
            # Only possible with a vocabulary whose BPE merges rebuild a marker string.
            raise OmniLMError(f"tokenizer {self.source} encodes plain text into a media placeholder id")
        if add_bos:
            if self.bos_token_id is None:
                raise ConfigError(f"tokenizer {self.source} has no bos token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def save(self, out_dir: str | os.PathLike) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.hf_config(), indent=2) + "\n")

    def hf_config(self) -> dict:
        """A tokenizer_config.json that transformers' PreTrainedTokenizerFast understands."""

        def name(tok_id):
            return None if tok_id is None else self.id_to_token(tok_id)

        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_token_id),
            "eos_token": name(self.eos_token_id),
            "pad_token": name(self.pad_token_id),
            "image_token": name(self.image_token_id),
            "audio_token": name(self.audio_token_id),
            "add_bos_token": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }

    def __repr__(self):
        return f"TextTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


# chat.render_chat as the Jinja template transformers' apply_chat_template and vLLM's chat endpoint
# render: string content is stripped, list content is its text parts plus one marker per medium.
_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '@SH@' + message['role'] + '@EH@\\n\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{- '@IMAGE@' -}}"
    "{%- elif part['type'] in ('audio', 'input_audio') -%}{{- '@AUDIO@' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '@EOT@' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '@SH@assistant@EH@\\n\\n' -}}{%- endif -%}"
)


def chat_template(tokenizer: TextTokenizer) -> str | None:
    """The Jinja twin of chat.render_chat for this tokenizer's token names; None if it lacks the header tokens."""
    ids = (tokenizer.bos_token_id, tokenizer.start_header_id, tokenizer.end_header_id, tokenizer.eot_token_id)
    if None in ids:
        return None
    name = tokenizer.id_to_token
    marker = {
        k: name(i) if i is not None else ""
        for k, i in (("@IMAGE@", tokenizer.image_token_id), ("@AUDIO@", tokenizer.audio_token_id))
    }
    out = _CHAT_TEMPLATE
    for key, value in (
        ("@SH@", name(ids[1])),
        ("@EH@", name(ids[2])),
        ("@EOT@", name(ids[3])),
        *marker.items(),
    ):
        out = out.replace(key, value)
    return out


@functools.lru_cache(maxsize=1)
def _default() -> TextTokenizer:
    if not (ASSET_DIR / "tokenizer.json").is_file():
        raise ConfigError(f"the embedded default tokenizer is missing from {ASSET_DIR}; reinstall omnilm")
    return TextTokenizer.from_dir(ASSET_DIR)


# ---- training -----------------------------------------------------------------------------------


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with OmniLM's pre-tokenizer, decoder and bos post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer_from_iterator(
    texts, vocab_size: int, out_dir: str | os.PathLike | None = None
) -> TextTokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed first, so they get ids 0..len-1 in this order.
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(BOS)
    # Same template as Llama-3, so transformers adds bos the way OmniLM's encode(add_bos=True) does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    result = TextTokenizer(tok, source="trained")
    assert [result.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    if out_dir is not None:
        result.save(out_dir)
        result.source = str(Path(out_dir) / "tokenizer.json")
    return result


def train_tokenizer(files, vocab_size: int, out_dir: str | os.PathLike) -> TextTokenizer:
    """Train a byte-level BPE on text files; writes tokenizer.json + tokenizer_config.json to out_dir."""
    files = [Path(f) for f in files]
    if not files:
        raise ConfigError("tokenizer train: no input files given")
    for f in files:
        if not f.is_file():
            raise ConfigError(f"tokenizer train: input file not found: {f}")

    def lines():
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield from fh

    return train_tokenizer_from_iterator(lines(), vocab_size, out_dir)
