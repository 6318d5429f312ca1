"""Writing model directories whole: the files a directory needs besides its weights, and atomic output.

A model directory is more than config + weights: its tokenizer, chat template, preprocessor configs,
generation defaults and the media tokenizers (image_tokenizer/, audio_tokenizer/) its codes come from.
`convert` and `compose` carry them over, write into a temporary sibling directory and rename it into
place at the end, so an interrupted run leaves nothing half written and a stale file from an earlier
run can never mix in. Files are created honouring the process umask (0644 under the usual 022).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError

# Looked for in this order; the first is what OmniLM's TextTokenizer reads.
TOKENIZER_FILES = ("tokenizer.json",)
CARRY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "audio_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
CARRY_DIRS = ("image_tokenizer", "audio_tokenizer")


# ---- modes ---------------------------------------------------------------------------------------------


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask has no getter)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path, directory: bool = False) -> None:
    """Give a file made by a library that creates it 0600 (a temporary file renamed) the mode
    open() would have given it: 0666 (0777 for a directory) less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


# ---- tokenizer presence -------------------------------------------------------------------------------


def has_tokenizer(path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def require_tokenizer(path, what: str = "model directory") -> None:
    """A directory without its tokenizer would silently get some other tokenizer: refuse it."""
    path = Path(path)
    if not has_tokenizer(path):
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise CheckpointError(
            f"{path}: {what} has no tokenizer ({' or '.join(TOKENIZER_FILES)} is missing; it holds "
            f"{', '.join(present[:8]) or 'nothing'}): pass one with --tokenizer DIR "
            "(Python: tokenizer=DIR), or copy the tokenizer files of the model it came from into it"
        )


# ---- output directories -------------------------------------------------------------------------------


def check_out_dir(out, overwrite: bool = False) -> Path:
    """Refuse an --out that would lose or mix data, before any work is done: a file, a non-empty
    directory (unless overwrite), or a place below a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"--out {out}: directory exists and is not empty (nothing was written); choose a new "
            "directory or pass --overwrite to replace it"
        )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {out}: {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it is removed
    and `out` is untouched."""
    out = check_out_dir(out, overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.absolute().parent))
    try:
        honour_umask(tmp, directory=True)  # mkdtemp makes it 0700
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=tmp.parent))
            os.rename(out, old / "out")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def carry(src, dst, names=CARRY_FILES, dirs=CARRY_DIRS, replace: bool = True) -> list[str]:
    """Copy the named files and folders that exist in src into dst; returns what was copied.
    With replace=False a file dst already has is kept."""
    src, dst = Path(src), Path(dst)
    done = []
    for name in names:
        f = src / name
        if f.is_file() and (replace or not (dst / name).exists()):
            shutil.copyfile(f, dst / name)  # copyfile: new files get the umask, not src's mode
            done.append(name)
    for name in dirs:
        d = src / name
        if d.is_dir() and (replace or not (dst / name).exists()):
            if (dst / name).exists():
                shutil.rmtree(dst / name)
            shutil.copytree(d, dst / name, copy_function=shutil.copyfile)
            done.append(name + "/")
    return done
