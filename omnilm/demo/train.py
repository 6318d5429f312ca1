"""The demo model and its training: a tiny OmniLM that reads digits (pixels, tones, PDFs) and draws them.

Sizes are picked so the full demo trains in a few minutes on 2 CPU cores: a 3-layer decoder of width
96; a 2-layer ViT on 16x16 digits with 4x4 patches, pixel-shuffled into 4 image tokens; a 2-layer Whisper-style encoder
on 1 s windows of 64-bin log-mel (50 frames, stacked by 4: 12 audio tokens); a VQ-VAE turning a 16x16
digit into 4x4 codes from a codebook of 128, which the decoder writes after <|image_start|>.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import AudioConfig, DecoderConfig, DiscreteConfig, ImageVQConfig, ModelConfig, VisionConfig
from ..models.discrete import modality_of, modality_ranges
from ..models.loss import IGNORE_INDEX, next_token_loss
from ..models.omni import OmniModel
from ..processing.image import ImageProcessor
from ..processing.multimodal import Processor
from ..tokenizers.text import TextTokenizer
from ..training.config import OptimConfig
from ..training.guard import NonFiniteGuard
from ..training.optim import build_optimizer, build_scheduler
from .data import VIDEO_FPS, collate

IMAGE_SIZE = 16
CODEBOOK = 128


def vq_config() -> ImageVQConfig:
    return ImageVQConfig(
        image_size=IMAGE_SIZE,
        channels=16,
        downsample=4,
        codebook_size=CODEBOOK,
        code_dim=32,
        dead_code_threshold=0.5,
    )


def model_config(tokenizer: TextTokenizer) -> ModelConfig:
    text_vocab = tokenizer.vocab_size
    vq = vq_config()
    return ModelConfig(
        decoder=DecoderConfig(
            vocab_size=text_vocab,
            hidden_size=96,
            num_layers=3,
            num_heads=4,
            intermediate_size=256,
            max_seq_len=128,
            rope_theta=10000.0,
            # wider than the usual 0.02: attention that starts less uniform finds the tones of a
            # dialled number sooner (audio-only runs at lr 1e-3 left their loss plateau after ~600
            # steps at 0.1, ~800 at 0.06, ~1500 at 0.02)
            initializer_range=0.1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision=VisionConfig(
            kind="siglip",
            image_size=IMAGE_SIZE,
            patch_size=4,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            pixel_shuffle=2,  # 2x2 patches per decoder token: 4 tokens per digit
        ),
        audio=AudioConfig(
            kind="whisper",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            num_mel_bins=64,
            max_source_positions=50,
            window_seconds=1.0,
            projector_stack=4,  # 12 decoder tokens per 1 s window, one per 80 ms
        ),
        # image codes are ids text_vocab.. text_vocab + 127, with their own embedding table and head
        discrete=DiscreteConfig(
            text_vocab_size=text_vocab,
            image_vocab_size=vq.codebook_size,
            image_grid=vq.grid_size,
            image_start_id=tokenizer.image_start_id,
            image_end_id=tokenizer.image_end_id,
            audio_start_id=tokenizer.audio_start_id,
            audio_end_id=tokenizer.audio_end_id,
            image_tokenizer=vq,
        ),
        image_token_id=tokenizer.image_token_id,
        audio_token_id=tokenizer.audio_token_id,
        source="omnilm demo: digits, DTMF tones and invoices (omnilm/demo)",
    )


def code_offset(cfg: ModelConfig) -> int:
    """Id of image code 0 in the concatenated vocabulary."""
    return cfg.discrete.image_offset


def build_processor(cfg: ModelConfig, tokenizer: TextTokenizer) -> Processor:
    image_processor = ImageProcessor(size=(IMAGE_SIZE, IMAGE_SIZE), resample=2)  # bilinear
    meta = {"video_fps": VIDEO_FPS, "max_video_frames": 4}  # two frames of each 1 s clip
    return Processor.from_model_config(cfg, tokenizer, image_processor, meta=meta)


def build_model(cfg: ModelConfig, seed: int = 0) -> OmniModel:
    torch.manual_seed(seed)
    model = OmniModel(cfg).init_weights()  # Whisper's fixed sinusoidal positions survive init_weights
    return model


def train_model(
    model: OmniModel,
    sample_fns: dict,
    steps: int,
    batch_mix: dict,
    pad_id: int,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    log=None,
    audio_steps: int = 0,
) -> dict:
    """Train on all tasks at once: each step draws batch_mix[task] samples from sample_fns[task](n, gen).

    Uses the project's optimizer pieces (AdamW groups without decay on norms/biases/embeddings, warmup
    then cosine). The first `audio_steps` steps train on dialled numbers alone: mixed in with the
    other tasks from the start, the audio path learned to count the tones but not to tell them apart
    within 3000 steps; alone it leaves its loss plateau within a few hundred. Returns {"seconds",
    "final_loss", "losses"}.
    """
    audio_first = {"audio": batch_mix["audio"]}
    from tqdm.auto import tqdm

    optim_cfg = OptimConfig(lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.01, min_lr_ratio=0.05)
    opt = build_optimizer(model, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, steps)
    gen = torch.Generator().manual_seed(seed)
    guard = NonFiniteGuard(what="demo training")
    model.train()
    losses = []
    start = time.time()
    bar = tqdm(range(steps), desc="train demo", disable=not progress, mininterval=0.5)
    for step in bar:
        # one batch per task: rows of a task have similar lengths, so little padding
        mix = audio_first if step < audio_steps else batch_mix
        batches = [collate(sample_fns[task](n, gen), pad_id) for task, n in mix.items()]
        loss = answer_loss(model, batches)
        guard.step(opt, loss, model.parameters(), optim_cfg.grad_clip, step)
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            if log is not None:
                log({"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0]})
    model.eval()
    return {"seconds": time.time() - start, "final_loss": float(np.mean(losses[-20:])), "losses": losses}


def answer_loss(model: OmniModel, batches: list[dict]) -> torch.Tensor:
    """Next-token loss on the answer positions of all batches, each scored by its target's head.

    The same value as OmniModel's `labels=` loss over all rows, but the heads run only where a label
    is: answers are a few tokens of each row, and the 2048-id text head would dominate the compute.
    """
    hidden, targets = [], []
    for batch in batches:
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["input_features"])  # (B, T, D)
        h = model.language_model.model(inputs_embeds=embeds)  # (B, T, D)
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = labels != -100  # (B, T - 1)
        hidden.append(h[:, :-1][keep])  # (n, D)
        targets.append(labels[keep])
    h, targets = torch.cat(hidden), torch.cat(targets)  # (N, D), (N,)
    logits = model.discrete.logits(h, model.language_model.lm_head)  # (N, V_text + V_image)
    # each answer token is scored by its own modality's head (as DiscreteModalities.loss does): the
    # softmax runs over that head's slice of the vocabulary only
    modality = modality_of(targets, model.discrete.cfg)
    total = logits.sum() * 0.0
    for m, (lo, hi) in enumerate(modality_ranges(model.discrete.cfg)):
        sel = modality == m
        if hi == lo or not sel.any():
            continue
        # next_token_loss scores logits[t] against labels[t + 1]: shift by one padded position
        part = torch.cat([logits[sel, lo:hi], logits.new_zeros(1, hi - lo)])[None]  # (1, n + 1, V_m)
        labels = torch.cat([targets.new_full((1,), IGNORE_INDEX), targets[sel] - lo])[None]  # (1, n + 1)
        total = total + next_token_loss(part, labels, reduction="sum")
    return total / len(targets)
