"""Small torch.distributed helpers that are no-ops on a single process: gathers and
reductions, with and without gradients, and MoCo's shuffle-BN."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

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


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean over processes; only called under DDP (the reference's unguarded
    all_reduce crashes a single process)."""
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over processes that backpropagates (the gradient is summed over processes too);
    the identity on one process."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    with _legacy_collectives_allowed():
        return all_reduce(tensor)


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenation over processes along dim 0 that backpropagates to each process's own
    rows (summed over processes); the identity on one process."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with _legacy_collectives_allowed():
        return torch.cat(all_gather(tensor), dim=0)


@contextlib.contextmanager
def _legacy_collectives_allowed() -> Iterator[None]:
    """Mute the FutureWarning of ``torch.distributed.nn.functional``: recent torch releases
    point to the private ``torch.distributed._functional_collectives``, whose autograd
    support is recent too; the public module backpropagates correctly on every torch we
    support (2.3 to 2.14), so we keep it, silently. (It refuses torch.compile.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed.nn.functional", category=FutureWarning
        )
        yield
