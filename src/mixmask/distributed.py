"""Small torch.distributed helpers that are no-ops on a single process."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_all(tensor: Tensor) -> Tensor:
    """Concatenate a tensor from every process along dim 0 (no gradient)."""
    if world_size() == 1:
        return tensor
    # Contiguous (NCHW) input and outputs alike: empty_like keeps a channels_last layout,
    # and NCCL's all_gather into outputs of another layout scrambles them or refuses.
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
             for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


@torch.no_grad()
def shuffled_forward(encode: Callable[[Tensor], Tensor], images: Tensor,
                     generator: torch.Generator) -> Tensor:
    """MoCo's shuffle-BN: run ``encode`` on a batch shuffled across processes, so per-process
    BN statistics of the keys do not come from the queries' own images, then un-shuffle.
    The permutation comes from ``generator`` (the step's, which checkpoints hold), so a
    resumed DDP run draws the permutations the uninterrupted one drew; process 0's wins."""
    if world_size() == 1:
        return encode(images)
    local = images.shape[0]
    gathered = gather_all(images)
    permutation = torch.randperm(gathered.shape[0], generator=generator,
                                 device=generator.device).to(images.device)
    dist.broadcast(permutation, src=0)
    rank = dist.get_rank()
    own = permutation[rank * local:(rank + 1) * local]
    keys = gather_all(encode(gathered[own]))
    inverse = torch.argsort(permutation)
    return keys[inverse][rank * local:(rank + 1) * local]
