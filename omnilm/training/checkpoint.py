"""Training checkpoints: written to a temporary directory and renamed, so a run killed mid-save leaves
the last complete checkpoint intact; the last K are kept.

    checkpoints/step-00000040/
        dcp/                  model + optimizer state through torch.distributed.checkpoint (sharded,
                              resumable on any number of processes, including one without a process group)
        trainer_state.json    step, scheduler, data-loader position, Python RNG, world size, config
        rng.safetensors       torch CPU (and CUDA) generator state of rank 0
        model/                the weights as safetensors, Hugging Face format where the model has one
                              (Llama, LLaVA; OmniLM format otherwise), base weights when training LoRA
        adapter/              with LoRA: the adapter in PEFT's layout

        manifest.json         written last: size and sha256 of every other file

A checkpoint is complete when its manifest is present and every file matches it; --resume takes the
newest complete one. Loading never unpickles anything but DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..convert.validate import read_json, read_safetensors
from ..errors import CheckpointError, OmniLMError

STEP_DIR = re.compile(r"^(step|\.old-step|\.tmp-step)-(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: every file's size and sha256
# where a directory stands for a step: the live name first, then a complete save not yet swapped in,
# then the previous copy a re-save moved aside
PRIORITY = {"step": 0, ".tmp-step": 1, ".old-step": 2}


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Checkpoints under root carrying a manifest (one directory per step), oldest first. Contents are
    verified by `latest_checkpoint`; this listing is cheap."""
    root = Path(root)
    if not root.is_dir():
        return []
    best: dict[int, tuple[int, Path]] = {}
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            step, rank = int(m.group(2)), PRIORITY[m.group(1)]
            if step not in best or rank < best[step][0]:
                best[step] = (rank, p)
    return sorted((step, p) for step, (_, p) in best.items())


def latest_checkpoint(root, log=None) -> Path | None:
    """The newest checkpoint whose files all match its manifest; incomplete or damaged ones are skipped
    (and reported through `log`)."""
    root = Path(root)
    candidates = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                candidates.append((-int(m.group(2)), PRIORITY[m.group(1)], p))
    for _, _, p in sorted(candidates):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            if log is not None:
                log(f"skipping {p.name}: {e}")
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root,
    step: int,
    model,
    optimizer,
    scheduler,
    loader_state: dict,
    config: dict,
    keep_last: int = 2,
    save_weights: bool = True,
) -> Path:
    """Write checkpoint `step` under root (all processes call this); returns its directory.

    The new checkpoint is written beside any old one and swapped in with renames, so at every instant a
    complete copy exists: step-N (old), then .old-step-N (old) + .tmp-step-N (new, manifest written),
    then step-N (new).
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:08d}"
    old = root / f".old-step-{step:08d}"
    if _rank() == 0:
        if tmp.exists():
            _remove(tmp)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    _barrier()

    model_state, optim_state = get_state_dict(model, optimizer)
    if not weights_finite(model_state):
        raise OmniLMError(
            f"step {step}: the weights hold NaN or inf; refusing to write a poisoned checkpoint"
        )
    with warnings.catch_warnings():  # DCP warns when it runs without a process group, as intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    if save_weights:
        _save_weights(model, tmp)

    if _rank() == 0:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "loader": loader_state,
            "python_rng": _py_rng_to_json(random.getstate()),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "config": config,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _write_manifest(tmp)
        if final.exists():  # the same step saved again (e.g. a run resumed from an earlier step)
            if old.exists():
                _remove(old)
            final.rename(old)
            tmp.rename(final)
            _remove(old)
        else:
            tmp.rename(final)
        _remove_leftovers(root)
        for _, stale in list_checkpoints(root)[:-keep_last]:
            _remove(stale)
    _barrier()
    return final


def _remove_leftovers(root: Path):
    """What killed saves left: half-deleted directories, and spare copies of steps whose live
    directory exists (a spare copy of a step without one is the only copy, and stays)."""
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if p.name.startswith(".del-"):
            shutil.rmtree(p, ignore_errors=True)
        elif m and m.group(1) != "step" and step_dir(root, int(m.group(2))).is_dir():
            _remove(p)


def _remove(path: Path):
    """Rename away first, so a kill during the delete never leaves a partial directory under a
    checkpoint's name."""
    doomed = path.with_name(f".del-{path.name.lstrip('.')}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(d: Path):
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    part = d / (MANIFEST + ".part")
    with open(part, "w") as fh:
        json.dump({"format": 1, "files": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    part.rename(d / MANIFEST)


def verify_checkpoint(path, hashes: bool = True):
    """CheckpointError unless every file the manifest names exists with its size (and sha256)."""
    path = Path(path)
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
    if manifest is None:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})")
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise CheckpointError(f"{path / MANIFEST}: 'files' must list every file, {STATE_FILE} included")
    root = path.resolve()
    for name, info in files.items():
        f = path / name
        if not f.resolve().is_relative_to(root):
            raise CheckpointError(f"{path / MANIFEST}: {name!r} lies outside the checkpoint")
        if not isinstance(info, dict) or not f.is_file() or f.stat().st_size != info.get("size"):
            raise CheckpointError(f"{f}: missing or not the size its manifest records")
        if hashes and _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"{f}: contents do not match the sha256 its manifest records")


def weights_finite(state: dict) -> bool:
    """True when every tensor (this process's shard of it under FSDP) is finite, on all processes."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    bad = torch.zeros((), dtype=torch.int64, device="cuda" if nccl else "cpu")
    for t in state.values():
        local = t.to_local() if hasattr(t, "to_local") else t
        bad += int(not torch.isfinite(local).all())
    if dist.is_initialized():
        dist.all_reduce(bad)
    return int(bad) == 0


def _save_weights(model, tmp: Path):
    """The full weights (gathered to rank 0 under FSDP) through the model's own save_pretrained."""
    from ..convert.hf import init_empty_weights, load_strict, retie
    from ..models.builder import model_class
    from .lora import dense_base_state, is_lora_key, save_adapter

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return
    base = {k: v for k, v in dense_base_state(model, full).items() if not is_lora_key(k)}
    with init_empty_weights():
        copy = model_class(model.config)(model.config)
    load_strict(copy, {k: v.float() for k, v in base.items()}, source="training state")
    retie(copy)
    copy.export_source = getattr(model, "export_source", None)  # so model/ gets the tokenizer too
    copy.save_pretrained(tmp / "model")
    if any(is_lora_key(k) for k in full):
        save_adapter(model, tmp / "adapter", state=full)


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns trainer_state.json's dict.

    Nothing here unpickles arbitrary objects: DCP's metadata goes through an allow-list unpickler, its
    byte items through torch.load(weights_only=True), the rest is JSON and safetensors.
    """
    path = Path(path)
    verify_checkpoint(path, hashes=False)
    state = read_json(path / STATE_FILE)
    model_state, optim_state = get_state_dict(model, optimizer)
    sd = {"model": model_state, "optim": optim_state}
    try:
        # DCP logs its fallbacks (rank-local metadata) as root-logger warnings: the error says enough
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                sd,
                storage_reader=SafeFileSystemReader(path / "dcp"),
                planner=SafeLoadPlanner(),
            )
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's own (a BaseException) for missing keys and files
        raise CheckpointError(f"{path / 'dcp'}: cannot restore the training state ({_reason(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = read_safetensors(path / "rng.safetensors")
    try:
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(_py_rng_from_json(state["python_rng"]))
        if not isinstance(state["step"], int) or not isinstance(state["loader"], dict):
            raise TypeError("'step' must be an integer and 'loader' an object")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: malformed training state ({type(e).__name__}: {e})") from None
    return state


def _reason(e: BaseException) -> str:
    """DCP wraps each rank's failure in a report with tracebacks; keep the message that says why."""
    for failure in getattr(e, "failures", {}).values():
        if isinstance(failure, tuple):  # (exception, traceback) in some torch versions
            failure = next((x for x in failure if isinstance(x, BaseException)), None)
        while isinstance(failure, BaseException):
            if isinstance(failure, CheckpointError):
                return str(failure)
            failure = failure.__cause__ or failure.__context__
    text = " ".join(str(e).split())
    m = re.search(r"global metadata read failed: (.*?)(?:; rank local metadata|$)", text)
    if m:
        return m.group(1)
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return " ".join((lines[-1] if lines else text).split())[:500]


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# DCP's metadata file is a pickle of these classes only; anything else is refused unread.
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {  # fmt: skip
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
MAX_METADATA_BYTES = 256 * 1024**2


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, source):
        super().__init__(fh)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source}: refers to {module}.{name}, which a checkpoint's metadata never needs; "
            "refused without running it"
        )


def read_dcp_metadata(f: Path) -> Metadata:
    """DCP's .metadata through the allow-list unpickler, then checked for shape and contained paths."""
    try:
        if f.stat().st_size > MAX_METADATA_BYTES:
            raise CheckpointError(f"{f}: larger than {MAX_METADATA_BYTES} bytes")
        with open(f, "rb") as fh:
            md = _RestrictedUnpickler(fh, f).load()
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or corrupt pickle fails in many ways
        raise CheckpointError(
            f"{f}: not a readable checkpoint metadata file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{f}: not checkpoint metadata (got {type(md).__name__})")
    root = f.parent.resolve()
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not (f.parent / rel).resolve().is_relative_to(root):
            raise CheckpointError(f"{f}: a storage path {rel!r} lies outside the checkpoint")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):  # fmt: skip
            raise CheckpointError(f"{f}: malformed storage offsets for {rel!r}")
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read by the allow-list unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        md = read_dcp_metadata(Path(self._get_metadata_path(rank)))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyper-parameters) are loaded with weights_only=True, not DCP's
    default full unpickling."""

    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint item {read_item.dest_index.fqn}: not plain data ({type(e).__name__})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
