"""Text on top of the token engine: incremental decoding, stop strings, printing as tokens arrive.

The engine sees token ids only; here a tokenizer (anything with `decode(ids) -> str`, such as
omnilm.tokenizers.text.TextTokenizer) turns them into text.
"""

from __future__ import annotations

import sys

import torch

from ..errors import OmniLMError
from .generate import stream_requests

REPLACEMENT = "\ufffd"  # what decoding gives for a UTF-8 character whose bytes are not all there yet


class TextStream:
    """The text of one growing sequence of token ids; `push(id)` returns the newly completed text.

    A character whose bytes span several tokens appears once, whole, and never as U+FFFD. Text that
    could be the start of a stop string is held back until it is clearly not one; the first stop
    string ends the stream (`stopped`) and is not returned. `finish()` returns what is still held back.

    Decoding is incremental (the prefix/read offsets of vLLM's and TGI's detokenizers): each push
    decodes a window of the last few tokens, twice, instead of the whole sequence, so a long answer
    costs O(n), not O(n^2). The window starts one committed step back, so a decoder that treats a
    sequence's first token specially (a leading-space rule) sees the same context as in a full decode.
    """

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self._committed = ""  # the decoded text of ids[:_read], complete characters only
        self._prefix = 0  # ids[_prefix:_read]: the context decoded before the new tokens
        self._read = 0

    def push(self, token_id) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self._decoded()
        # Held-back text is never emitted, so a stop string can only start at or after `emitted`.
        stops = [i for i in (text.find(s, self.emitted) for s in self.stop_strings) if i >= 0]
        if stops:
            self.stopped = True
            return self._emit(text, min(stops))
        return self._emit(text, len(text) - self._stop_prefix_len(text))

    def _decoded(self) -> str:
        """decode(ids) without the broken character at its end, from the window since the last commit."""
        context = (
            self.tokenizer.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        )
        window = self.tokenizer.decode(self.ids[self._prefix :])
        complete = window.rstrip(REPLACEMENT)
        if len(complete) < len(context) or not complete.startswith(context):
            return self.tokenizer.decode(self.ids).rstrip(REPLACEMENT)  # the window disagrees: decode it all
        if complete == window:  # every character whole: commit, the next window starts here
            self._committed += window[len(context) :]
            self._prefix, self._read = self._read, len(self.ids)
            return self._committed
        return self._committed + complete[len(context) :]

    def finish(self) -> str:
        """The rest of the text once generation ended (a held-back stop-string start, a broken byte)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        return self._emit(text, len(text))

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self.tokenizer.decode(self.ids)[: self.emitted]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest unemitted suffix of text that is a proper prefix of a stop string."""
        pending = len(text) - self.emitted
        for n in range(min(max((len(s) for s in self.stop_strings), default=1) - 1, pending), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _emit(self, text: str, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = text[self.emitted : end], end
        return out


def stream_text(model, tokenizer, input_ids, stop_strings=(), **settings):
    """Yield the text of one prompt's continuation piece by piece as tokens are generated.

    Stops at an eos token (not printed), at the first stop string (not printed) or after
    max_new_tokens. settings: as omnilm.generation.engine.generate.
    """
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if input_ids.shape[0] != 1:
        raise OmniLMError(f"stream_text takes one prompt, got a batch of {input_ids.shape[0]}")
    text = TextStream(tokenizer, stop_strings)
    steps = stream_requests(model, input_ids, **settings)
    try:
        for token, finished in steps:
            if bool(finished[0]):  # the eos token itself is not part of the text
                break
            piece = text.push(token[0])
            if piece:
                yield piece
            if text.stopped:
                return
        rest = text.finish()
        if rest:
            yield rest
    finally:
        steps.close()  # leaving early (stop string, consumer stopped) ends generation


def generate_text(model, tokenizer, input_ids, stop_strings=(), attention_mask=None, **settings) -> list[str]:
    """The continuation text of every row of a (left-padded) batch, each cut at its first stop string
    or eos; generation ends once every row has stopped."""
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    texts = [TextStream(tokenizer, stop_strings) for _ in range(input_ids.shape[0])]
    done = [False] * len(texts)
    steps = stream_requests(model, input_ids, attention_mask=attention_mask, **settings)
    try:
        for token, finished in steps:
            token, finished = token.tolist(), finished.tolist()
            for i, t in enumerate(texts):
                if not done[i] and not finished[i]:
                    t.push(token[i])
                done[i] = done[i] or finished[i] or t.stopped
            if all(done):
                break
    finally:
        steps.close()
    for t in texts:
        t.finish()
    return [t.text for t in texts]


def print_stream(model, tokenizer, input_ids, settings=None, stop_strings=(), out=None) -> str:
    """`omnilm generate --stream`: print the continuation as it is generated; returns the whole text."""
    out = out or sys.stdout
    pieces = []
    for piece in stream_text(model, tokenizer, input_ids, stop_strings, **(settings or {})):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    out.flush()
    return "".join(pieces)
