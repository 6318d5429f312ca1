"""Training configs: typed dataclasses loaded from a small YAML file (unknown keys are a ConfigError).

    model: tiny                      # a preset name, or a model directory (Hugging Face or OmniLM)
    data: {path: data/tiny.jsonl, seq_len: 128}
    steps: 200
    batch_size: 8                    # global rows per step, split across processes and micro-batches
    optim: {lr: 3.0e-3, warmup_steps: 20}
    freeze: [vision_tower]           # module name prefixes whose parameters are not trained
    lora: {rank: 8, alpha: 16}       # optional: train LoRA adapters only

Relative paths (data, model, tokenizer) are resolved against the YAML file's directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import from_dict
from ..errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    path: str = ""  # JSONL: {"text": ...} or {"messages": [...]} per line
    seq_len: int = 256  # tokens per packed row
    pack: bool = True  # several samples per row (document-masked); False: one sample per row, padded
    shuffle: bool = True
    # Samples longer than seq_len are cut at the end ("truncate", never inside a media span) or dropped.
    overflow: str = "truncate"  # "truncate" | "drop"

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.overflow not in ("truncate", "drop"):
            raise ConfigError(f"data.overflow must be 'truncate' or 'drop', got {self.overflow!r}")


@dataclass
class OptimConfig:
    """AdamW with the 88B design's hyperparameters (seeds/001) as defaults, warmup then cosine decay."""

    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # 0 turns clipping off (the norm is still measured and reported)
    module_lr: dict[str, float] = field(default_factory=dict)  # name prefix -> lr (longest prefix wins)

    def __post_init__(self):
        # YAML 1.1 reads "3e-3" (no dot) as a string; accept it as the number it plainly is.
        for name in ("lr", "eps", "weight_decay", "min_lr_ratio", "grad_clip"):
            setattr(self, name, _number(getattr(self, name), f"optim.{name}"))
        self.module_lr = {k: _number(v, f"optim.module_lr[{k!r}]") for k, v in self.module_lr.items()}
        self.betas = [_number(b, "optim.betas") for b in self.betas]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                "optim.lr and optim.eps must be positive; weight_decay and grad_clip non-negative"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name, lr in self.module_lr.items():
            if lr < 0:
                raise ConfigError(f"optim.module_lr[{name!r}] must be non-negative, got {lr!r}")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # or tails: cross_attn.q_proj
    quantize_base: str | None = None  # QLoRA: the frozen base stored as "nf4" or "int4"

    def __post_init__(self):
        if self.quantize_base not in (None, "nf4", "int4"):
            raise ConfigError(f"lora.quantize_base must be 'nf4' or 'int4', got {self.quantize_base!r}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets must name at least one linear layer")


@dataclass
class TrainConfig:
    model: str = "tiny"  # preset name or model directory
    tokenizer: str | None = None  # directory with tokenizer.json; None: the model's, else the default
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None
    steps: int = 100  # schedule length; --max-steps stops earlier without changing it
    batch_size: int = 8  # global rows per optimizer step
    grad_accum: int = 1  # micro-batches per step on each process
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    freeze: list[str] = field(default_factory=list)  # module name prefixes, e.g. vision_tower
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp: str = "auto"  # auto: FSDP2 when launched with more than one process; "off" | "on"
    save_every: int = 0  # 0: only at the end (and at --max-steps)
    keep_last: int = 2
    log_every: int = 1
    max_bad_steps: int = 3  # consecutive non-finite steps that stop the run
    out: str = "runs/train"
    config_dir: str = ""  # filled by load_train_config: relative paths resolve here

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fsdp not in ("auto", "on", "off"):
            raise ConfigError(f"fsdp must be 'auto', 'on' or 'off', got {self.fsdp!r}")
        if self.keep_last < 1 or self.save_every < 0 or self.log_every < 1 or self.max_bad_steps < 1:
            raise ConfigError("keep_last, log_every and max_bad_steps must be >= 1, save_every >= 0")
        if isinstance(self.freeze, str):
            self.freeze = [self.freeze]

    def resolve(self, path: str | None) -> Path | None:
        """A path from the config, relative to the config file's directory."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() or not self.config_dir else Path(self.config_dir) / p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def load_train_config(path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of training settings at the top level")
    try:
        cfg = train_config_from_dict(raw)
    except TypeError as e:  # a wrong value type reaching a dataclass
        raise ConfigError(f"{path}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.config_dir = str(path.resolve().parent)
    return cfg


def train_config_from_dict(d: dict) -> TrainConfig:
    """Nested dict -> TrainConfig; unknown keys at any level are a ConfigError naming them."""
    for key in ("data", "optim", "lora"):
        if key in d and d[key] is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{key} must be a mapping, got {d[key]!r}")
    return from_dict(TrainConfig, d)
