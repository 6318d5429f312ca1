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

A directory counts as complete once it carries its final name (the rename is the commit).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError, OmniLMError

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


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
    """Write checkpoint `step` under root (all processes call this); returns its directory."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:08d}"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-save
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
        if final.exists():  # the same step saved again (e.g. --max-steps at a save_every step)
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


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
    from .lora import is_lora_key, save_adapter

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return
    base = {k: v for k, v in full.items() if not is_lora_key(k)}
    with init_empty_weights():
        copy = model_class(model.config)(model.config)
    load_strict(copy, {k: v.float() for k, v in base.items()}, source="training state")
    retie(copy)
    copy.export_source = getattr(model, "export_source", None)  # so model/ gets the tokenizer too
    copy.save_pretrained(tmp / "model")
    if any(is_lora_key(k) for k in full):
        save_adapter(model, tmp / "adapter", state=full)


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns trainer_state.json's dict."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    sd = {"model": model_state, "optim": optim_state}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(path / "dcp"))
    except Exception as e:  # DCP raises its own error types for missing keys and files
        raise CheckpointError(f"{path / 'dcp'}: cannot restore the training state ({e})") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_py_rng_from_json(state["python_rng"]))
    return state


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
