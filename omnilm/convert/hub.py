"""Hugging Face hub ids (`meta-llama/Llama-3.2-1B`, `org/name@revision`) resolved to a local directory.

Resolution goes through `huggingface_hub.snapshot_download`: its cache (HF_HUB_CACHE, else HF_HOME/hub,
else ~/.cache/huggingface/hub), HF_HUB_OFFLINE=1 (cache only, no network), revisions (a branch, tag or
commit after `@`) and HF_TOKEN for gated repos. Only what OmniLM reads is downloaded: pickle weights
(.bin, .pt, .pth, ...) and other frameworks' files are never fetched, so a pickle-only repo ends up with
no safetensors and is refused as a local one is.

The environment is read at call time (huggingface_hub reads it once at import, which transformers
may have done before the caller set HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# owner/name with hub-legal characters, optionally @revision; never a path that starts with . / ~
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
SKIPPED = [
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.pickle",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.ot",
    "*.tflite",
    "original/*",  # Meta's consolidated .pth copies
]


def is_hub_id(name) -> bool:
    """A string shaped like `owner/name[@revision]` that is not an existing local path."""
    return isinstance(name, str) and bool(HUB_ID.match(name)) and not Path(name).exists()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "on", "yes", "true")


def offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def local_path(name) -> Path:
    """A hub id's snapshot directory; anything else as the path it names."""
    return resolve(name) if is_hub_id(name) else Path(name)


def resolve(name: str, revision: str | None = None) -> Path:
    """The local snapshot directory of hub id `name` (downloaded unless offline or already cached)."""
    m = HUB_ID.match(name)
    if not m:
        raise CheckpointError(f"{name}: not a Hugging Face hub id (expected owner/name[@revision])")
    repo, revision = m["repo"], revision or m["revision"]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise CheckpointError(
            f"{name}: not a local directory, and huggingface_hub is not installed"
        ) from None
    where = f"{repo}" + (f"@{revision}" if revision else "")
    is_offline = offline()
    try:
        path = snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache_dir(),
            local_files_only=is_offline,
            ignore_patterns=SKIPPED,
        )
    except Exception as e:  # the hub's own errors: not found, gated, offline, no network, bad revision
        reason = _reason(e, is_offline)
        raise CheckpointError(f"{name}: no such local directory, and hub id {where} {reason}") from None
    path = Path(path)
    if not is_offline and not any(path.glob("*.safetensors")):
        _refuse_pickle_only(repo, revision, where)
    return path


def _refuse_pickle_only(repo: str, revision: str | None, where: str) -> None:
    """The pickle weights were not downloaded; say so rather than 'no model.safetensors'."""
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo, revision=revision)
    except Exception:  # the listing is only for a better message
        return
    pickles = [f for f in files if f.endswith(tuple(p[1:] for p in SKIPPED[:6]))]
    if pickles:
        raise CheckpointError(
            f"{where}: only pickle weights on the hub ({', '.join(pickles[:3])}); pickle checkpoints are "
            "refused (they can run code): use a safetensors revision or convert it"
        )


def _reason(e: Exception, is_offline: bool) -> str:
    kind = type(e).__name__
    if is_offline or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        state = "HF_HUB_OFFLINE=1" if is_offline else "no network"
        return f"is not in the cache {cache_dir()} ({state}; download it once online)"
    if kind == "GatedRepoError":
        return "is gated: accept its license on huggingface.co and set HF_TOKEN"
    if kind == "RepositoryNotFoundError":
        return "was not found on the hub (or it is private: set HF_TOKEN)"
    if kind == "RevisionNotFoundError":
        return "names a revision the repo does not have"
    return f"could not be fetched ({kind}: {' '.join(str(e).split())[:200]})"
