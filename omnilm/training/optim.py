"""AdamW parameter groups (decay / no decay, per-module learning rates, freezing) and the schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .config import OptimConfig


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """requires_grad=False for parameters under any of the name prefixes; returns how many."""
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(n, prefix) for n in names):
            raise ConfigError(
                f"freeze: no parameter is under {prefix!r} (the model's top modules: {_tops(model)})"
            )
    n_frozen = 0
    for name, p in model.named_parameters():
        if any(_under(name, prefix) for prefix in prefixes):
            p.requires_grad_(False)
            n_frozen += p.numel()
    return n_frozen


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _tops(model: nn.Module) -> str:
    return ", ".join(n for n, m in model.named_children() if m is not None)


def no_decay(name: str, p: nn.Parameter) -> bool:
    """Norm weights and biases (1-D) and embeddings (modules named *embed*) are not decayed."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return p.dim() < 2 or "embed" in module.rsplit(".", 1)[-1]


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per (learning rate, decay) pair; the longest matching module_lr prefix sets the lr."""
    for prefix in cfg.module_lr:
        if not any(_under(n, prefix) for n, _ in model.named_parameters()):
            raise ConfigError(
                f"optim.module_lr: no parameter is under {prefix!r} (top modules: {_tops(model)})"
            )
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        matches = [prefix for prefix in cfg.module_lr if _under(name, prefix)]
        lr = cfg.module_lr[max(matches, key=len)] if matches else cfg.lr
        decay = not no_decay(name, p)
        g = groups.setdefault(
            (lr, decay), {"params": [], "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        )
        g["params"].append(p)
    if not groups:
        raise ConfigError("no trainable parameters: everything is frozen")
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1 over `warmup` steps, then cosine from 1 to min_ratio at `total`.

    `step` counts optimizer steps already taken (0 for the first)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
