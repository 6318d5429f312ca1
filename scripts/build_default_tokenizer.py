"""Rebuild the embedded default tokenizer (omnilm/assets/tokenizer/) from text that ships offline.

The corpus is Python standard-library docstrings (English prose about programs), digit strings and
the phrases the demo uses. Run: `python scripts/build_default_tokenizer.py [--out DIR] [--vocab-size N]`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import warnings

from omnilm.tokenizers.text import ASSET_DIR, train_tokenizer_from_iterator

# A fixed module list keeps the corpus stable across machines (no site-packages, no platform modules).
STDLIB_MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "sched", "secrets", "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "turtle", "typing", "unittest", "urllib.parse", "uuid", "wave",
    "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
]  # fmt: skip

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

DEMO_PHRASES = [
    "which digit is this?", "What digit is this?", "It is a {d}.", "This is the digit {d}.", "draw a {d}",
    "Draw the digit {d}.", "what number was dialled?", "The number dialled was {n}.", "The dialled digits are {n}.",
    "The document says {n}.", "The document says the total is {n}.", "What does the document say?",
    "What is the invoice number in the document?", "Invoice number: {n}", "Page {d} of the report.",
    "Which digit is shown in the picture in the document?", "The picture shows a {d}.",
    "Describe the image.", "Transcribe the audio.", "Listen to the tones and write the number.",
    "Here is an image of a handwritten {w}.", "The answer is {n}.", "Sure, here is a {w}.",
]  # fmt: skip


def docstrings():
    warnings.simplefilter("ignore")
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing on this platform only shrinks the corpus a little
            continue
        doc = inspect.getdoc(mod)
        if doc:
            yield doc
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(
                obj, "__module__", ""
            ) == mod.__name__:
                doc = inspect.getdoc(obj)
                if doc:
                    yield doc


def synthetic(rng: random.Random, n: int = 4000):
    for _ in range(n):
        d = rng.randrange(10)
        num = "".join(str(rng.randrange(10)) for _ in range(rng.randint(1, 8)))
        yield rng.choice(DEMO_PHRASES).format(d=d, n=num, w=DIGIT_WORDS[d])
    for _ in range(n // 4):
        yield " ".join(str(rng.randrange(10 ** rng.randint(1, 6))) for _ in range(8))


def corpus():
    yield from docstrings()
    yield from synthetic(random.Random(0))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()
    tok = train_tokenizer_from_iterator(corpus(), args.vocab_size, args.out)
    print(f"wrote {args.out}: vocab {tok.vocab_size}")


if __name__ == "__main__":
    main()
