"""The training loop: an explicit loop, no framework.

Order of assembly (torchtitan's): build the model (fp32 master weights) -> freeze / LoRA ->
activation checkpointing per block -> torch.compile per block -> FSDP2 per block then the root ->
optimizer and schedule -> restore a checkpoint. Each step takes one global batch (rows split across
processes, then into micro-batches), sums the token losses, divides by the global number of learned
tokens (so the loss does not depend on how the batch is split), clips, and steps; a non-finite loss or
gradient norm skips the update, and `max_bad_steps` of them in a row stop the run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from ..config import PRESETS
from ..errors import ConfigError
from ..models.loss import next_token_loss
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import IGNORE, ResumableLoader, load_samples, pack
from .guard import NonFiniteGuard
from .optim import build_optimizer, build_scheduler, freeze

# dense bf16 peak of the GPUs MFU is reported for (vendor datasheets, without sparsity)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


# ---- assembly -------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, device):
    """A preset with fresh weights (seeded), or a model directory; fp32 master weights, train mode."""
    from .. import api

    if cfg.model in PRESETS:
        model = api.build(cfg.model, seed=cfg.seed)
    else:
        path = cfg.resolve(cfg.model)
        if not path.is_dir():
            raise ConfigError(
                f"model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory"
            )
        model = api.load(path, dtype=torch.float32)
    return model.to(device=device, dtype=torch.float32).train()


def load_tokenizer(cfg: TrainConfig, vocab_size: int):
    from ..tokenizers.text import TextTokenizer

    if cfg.tokenizer is not None:
        tok = TextTokenizer.from_dir(cfg.resolve(cfg.tokenizer))
    elif cfg.model not in PRESETS and (cfg.resolve(cfg.model) / "tokenizer.json").is_file():
        tok = TextTokenizer.from_dir(cfg.resolve(cfg.model))
    else:
        tok = TextTokenizer.default()
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
        )
    return tok


def load_processor(cfg: TrainConfig, model, tokenizer):
    """The multimodal processor of a model with encoders (None for text-only models): the model
    directory's own, or one built from the preset's config. A cross-attention (Mllama) model's is
    its directory's MllamaProcessor, sharing the training tokenizer."""
    if getattr(model.config, "cross_attention", None) is not None:
        if cfg.model in PRESETS:
            raise ConfigError(
                f"model {cfg.model!r}: a cross-attention preset has no image processor; train from a "
                "model directory (e.g. one written by `omnilm compose --fusion cross-attention`)"
            )
        from ..api import load_processor as load_model_processor

        return load_model_processor(cfg.resolve(cfg.model), tokenizer)
    if model.vision_tower is None and model.audio_tower is None:
        return None
    from ..processing.multimodal import Processor
    from ..processing.multimodal import load_processor as load_dir_processor

    if cfg.model not in PRESETS:
        return load_dir_processor(cfg.resolve(cfg.model))
    return Processor.from_model_config(model.config, tokenizer)


def apply_activation_checkpointing(model):
    """Recompute each block's activations in backward. The block's forward is wrapped on the
    instance, so parameter names (and checkpoints) do not change."""
    from ..distributed.fsdp import transformer_blocks

    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model):
    """torch.compile each block in place (names unchanged); the model stays eager around them."""
    from ..distributed.fsdp import transformer_blocks

    for block in transformer_blocks(model):
        block.compile()


def flops_per_token(dcfg, seq_len: int) -> float:
    """Training FLOPs per token of a decoder config: 6 x matmul parameters (the head included, tied or
    not) + 12 x layers x heads x head_dim x seq_len for attention (PaLM's estimate, appendix B)."""
    D, hd = dcfg.hidden_size, dcfg.head_dim
    attn = D * hd * (2 * dcfg.num_heads + 2 * dcfg.num_kv_heads)  # q, o and k, v projections
    mlp = (3 if dcfg.mlp == "swiglu" else 2) * D * dcfg.intermediate_size
    matmul = dcfg.num_layers * (attn + mlp) + dcfg.vocab_size * D
    return 6 * matmul + 12 * dcfg.num_layers * dcfg.num_heads * hd * seq_len


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # tensorboard not installed
        return None


# ---- the trainer ------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, out, resume: bool = False, progress: bool = True):
        from ..distributed.fsdp import apply_fsdp, init_distributed

        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.dist = init_distributed()
        device = self.dist.device
        torch.manual_seed(cfg.seed)
        self.model = model = build_model(cfg, device)
        # bf16 compute with fp32 master weights: autocast, or FSDP's mixed-precision policy under FSDP
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

        tok = load_tokenizer(cfg, model.config.decoder.vocab_size)
        # checkpoints' model/ carries the tokenizer the model was trained with
        model.export_source = Path(tok.source).parent
        samples = load_samples(cfg.resolve(cfg.data.path), tok, load_processor(cfg, model, tok))
        rows = pack(samples, cfg.data.seq_len, cfg.data.pack, cfg.data.overflow)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.loader = ResumableLoader(
            rows, cfg.data.seq_len, cfg.batch_size, pad_id, cfg.seed, cfg.data.shuffle,
            self.dist.rank, self.dist.world_size, cfg.grad_accum,
        )  # fmt: skip

        freeze(model, cfg.freeze)
        if cfg.lora is not None:
            from .lora import apply_lora, apply_qlora

            lora = cfg.lora
            if lora.quantize_base:  # QLoRA: adapters over a frozen 4-bit base
                apply_qlora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, lora.quantize_base)
            else:
                apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.compile:
            apply_compile(model)
        use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and self.dist.world_size > 1)
        if self.dist.world_size > 1 and not use_fsdp:
            raise ConfigError("fsdp: 'off' with several processes is not supported; use 'auto' or 'on'")
        if use_fsdp and not dist.is_initialized():
            raise ConfigError("fsdp: 'on' needs a process group; launch with torchrun")
        self.fsdp = use_fsdp
        if use_fsdp:
            apply_fsdp(model, param_dtype=torch.bfloat16 if self.bf16 else None)

        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.step = 0
        if resume:
            ckpt = latest_checkpoint(self.out / "checkpoints", log=self.log)
            if ckpt is None:
                self.log(f"no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
            else:
                state = load_checkpoint(ckpt, model, self.optimizer, self.scheduler)
                self.loader.load_state_dict(state["loader"])
                self.step = state["step"]
                self.log(f"resumed from {ckpt} (step {self.step})")
        self.flops_per_token = flops_per_token(model.config.decoder, cfg.data.seq_len)
        self.peak = peak_flops(device)

    def log(self, msg: str):
        if self.dist.is_main:
            print(msg, flush=True)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size > 1:
            dist.all_reduce(t)
        return t

    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy. A model with discrete image/audio heads scores each position
        with its target's head (weighted per modality), as OmniModel.forward(labels=...) does."""
        discrete = getattr(self.model, "discrete", None)
        if discrete is not None:
            return discrete.loss_sums(logits, labels)[0]
        return next_token_loss(logits, labels, reduction="sum")

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float]:
        """One optimizer step over this process's micro-batches; returns (loss, grad norm)."""
        device = self.dist.device
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
        n_tokens = self._all_reduce(torch.tensor(float(n_tokens), device=device))
        # FSDP averages gradients over processes; the loss is already a global mean, so undo it
        scale = self.dist.world_size / n_tokens.clamp(min=1)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.bf16 and not self.fsdp
            else contextlib.nullcontext()
        )
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            if self.fsdp:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            with autocast:
                logits = self.model(**batch).logits  # (B, T, V)
            ce = self._loss_sum(logits, labels)
            (ce * scale).backward()
            loss_sum += ce.detach()
        loss = self._all_reduce(loss_sum) / n_tokens.clamp(min=1)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        loss_f, norm_f = float(loss), float(grad_norm)
        if NonFiniteGuard.finite(loss_f, norm_f):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # skipped steps keep their place in the schedule
        return loss_f, norm_f

    def train(self, max_steps: int | None = None) -> list[dict]:
        """Run to min(max_steps, cfg.steps); returns the metrics of the steps run by this call."""
        cfg = self.cfg
        stop = min(max_steps or cfg.steps, cfg.steps)
        ckpt_root = self.out / "checkpoints"
        metrics_file = self.out / "metrics.jsonl"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_file, self.step)
        writer = _tensorboard(self.out) if self.dist.is_main else None
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=self.step, desc="train", dynamic_ncols=True)
        history = []
        guard = NonFiniteGuard(cfg.max_bad_steps, "training", log=self.log)
        tokens_per_step = cfg.batch_size * cfg.data.seq_len
        try:
            while self.step < stop:
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm = self.train_step(self.loader.next_batch())
                if self.dist.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                skipped = not guard.finite(loss, grad_norm)
                rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_step / dt, "skipped": skipped}  # fmt: skip
                if self.peak is not None:
                    rec["mfu"] = (
                        rec["tokens_per_s"] * self.flops_per_token / (self.peak * self.dist.world_size)
                    )
                history.append(rec)
                if self.dist.is_main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if writer is not None:
                        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                            if k in rec and math.isfinite(rec[k]):
                                writer.add_scalar(f"train/{k}", rec[k], self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                hint = ""
                if skipped and guard.streak + 1 >= cfg.max_bad_steps:  # about to stop: name the fallback
                    last = latest_checkpoint(ckpt_root)
                    hint = f"Nothing saved; last good checkpoint: {last or 'none'}. Or raise max_bad_steps. "
                if not guard.observe(self.step, loss, grad_norm, hint):
                    continue
                if self.step == stop or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return history

    def save(self):
        return save_checkpoint(
            self.out / "checkpoints", self.step, self.model, self.optimizer, self.scheduler,
            self.loader.state_dict(), self.cfg.to_dict(), keep_last=self.cfg.keep_last,
        )  # fmt: skip


def _truncate_metrics(path: Path, step: int):
    """A resumed run rewrites the steps after its checkpoint; a fresh run starts a new file."""
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and step and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def train(
    cfg: TrainConfig, out=None, max_steps: int | None = None, resume: bool = False, progress: bool = True
):
    """Build a Trainer and run it; returns the per-step metrics of this call."""
    created = not dist.is_initialized()
    try:
        trainer = Trainer(cfg, out or cfg.out, resume=resume, progress=progress)
        return trainer.train(max_steps)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
