"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied from outside to a built OmniModel.

Each transformer block (decoder layers, and the encoder layers of vision/audio towers) becomes its own
FSDP unit, so only one block's full parameters are gathered at a time; the root call shards the rest
(embeddings, final norm, head, projectors). The mixed-precision policy computes in `param_dtype`
(bf16 on GPU) and reduces gradients in fp32, keeping fp32 master weights in the optimizer.

Launch with torchrun; `init_distributed` reads the environment it sets (RANK, WORLD_SIZE, LOCAL_RANK).
Works on CPU with the gloo backend (tests use it) and on GPUs with NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU); a single process
    without torchrun's environment stays non-distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if not dist.is_initialized():
        return DistInfo(device=device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of every tower: ModuleLists named `layers` (decoder, encoders)."""
    blocks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            blocks.extend(m)
    return blocks


def apply_fsdp(
    model: nn.Module,
    param_dtype: torch.dtype | None = None,
    reduce_dtype=torch.float32,
    reshard_after_forward=True,
):
    """fully_shard every block, then the root. Parameters become DTensors sharded on dim 0."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
