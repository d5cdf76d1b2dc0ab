"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297) as a Siamese base.

Query encoder f_q = backbone + MLP projector; key encoder f_k its EMA (MoCo eq. 2),
InfoNCE of each query against its key and a queue of past keys (MoCo eq. 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.errors import ConfigError
from mixmask.methods.common import check_unit_interval, cosine_momentum, head_in_float32
from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import (
    SiameseMethod,
    SymmetricReduction,
)
from mixmask.models.heads import MLPHead
from mixmask.ops.distributed import gather_all, shuffled_forward
from mixmask.ops.losses.siamese import info_nce

# Say so when more than this share of the images meet their own previous-epoch key among
# their negatives (stale_key_share): 1 in 100, ten times MoCo's own recipes; warn when
# most do (the queue then covers the whole set).
STALE_KEY_NOTE = 0.01
STALE_KEY_WARNING = 0.5


def stale_key_share(queue_size: int, train_images: int, keys_per_image: int) -> float:
    """The share of images whose key from the previous epoch is still in the queue when
    they are drawn again. The queue holds the keys of the last C = queue_size /
    keys_per_image images (a symmetric loss enqueues both views' keys). With the order
    reshuffled every epoch, an image drawn at p1 in one epoch and p2 in the next (p1, p2
    uniform on [0, N)) comes back after N + p2 - p1 images, fewer than C with probability
    r^2 / 2 for r = C / N <= 1, and 1 - (2 - r)^2 / 2 up to r = 2. MoCo on ImageNet
    (65,536 keys, 1.28M images, one key each): 0.13%; MoCo's CIFAR demo (4,096 keys,
    50,000 images, symmetric): 0.08%; our quickstart before issue 22 (4,096 keys, 5,000
    images, one key each): 34%."""
    ratio = min(queue_size / keys_per_image / train_images, 2.0)
    return ratio ** 2 / 2 if ratio <= 1 else 1 - (2 - ratio) ** 2 / 2


@dataclass
class MoCoV2Config:
    """MoCo v2 (Chen et al. 2020, arXiv 2003.04297); defaults: the Un-Mix CIFAR recipe."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    queue_size: int = 4096
    momentum: float = 0.99
    # constant (MoCo v2, Un-Mix) or cosine from momentum to momentum_end (solo-learn's
    # MoCo v2+ CIFAR recipe: 0.99 -> 0.999).
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    momentum_end: float = 0.999
    temperature: float = 0.1
    # Symmetric loss: each view is query once and key once (two losses, both keys enqueued).
    symmetric: bool = True
    # The two directions summed (Un-Mix's CIFAR code and MoCo's CIFAR demo: loss_12 +
    # loss_21) or averaged (solo-learn's MoCo v2+).
    symmetric_reduction: SymmetricReduction = "sum"
    # Shuffle-BN for the key encoder across processes under DDP (no-op on one device, where
    # BN already normalises over the whole batch).
    shuffle_bn: bool = True


@register_method("mocov2")
class MoCoV2(SiameseMethod):
    config_class = MoCoV2Config

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.symmetric = params.symmetric
        self.symmetric_reduction = params.symmetric_reduction
        self.temperature = params.temperature
        self.momentum = params.momentum
        self.momentum_end = (params.momentum_end if params.momentum_schedule == "cosine"
                             else params.momentum)
        self.shuffle_bn = params.shuffle_bn
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim, params.proj_output_dim)
        self.build_target_network()
        queue = F.normalize(torch.randn(params.queue_size, params.proj_output_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        params = config.method.mocov2
        # A step enqueues the keys of the whole (global) batch, of both views when
        # symmetric: a smaller queue would write some slots twice in one step, and which
        # write wins is unspecified on CUDA.
        keys_per_step = config.train.batch_size * (2 if params.symmetric else 1)
        if params.queue_size < keys_per_step:
            raise ConfigError(
                f"'method.mocov2.queue_size' ({params.queue_size}) must hold at least one "
                f"step's keys ({keys_per_step}: train.batch_size={config.train.batch_size}"
                f"{' x 2 views, symmetric' if params.symmetric else ''}).")
        check_unit_interval(params, "method.mocov2", "momentum", "momentum_end")
        if params.temperature <= 0:
            raise ConfigError(f"'method.mocov2.temperature' must be positive, got "
                              f"{params.temperature}.")

    @classmethod
    def data_warnings(cls, config, train_images: int) -> list[str]:
        params = config.method.mocov2
        keys_per_image = 2 if params.symmetric else 1
        stale = stale_key_share(params.queue_size, train_images, keys_per_image)
        if stale <= STALE_KEY_NOTE:
            return []
        # Measured on the quickstart (34%; docs/results.md): no kNN cost against a queue of
        # 512 (0.5%), so a note; a queue that holds every image's previous key is a warning.
        kind = "Warning" if stale >= STALE_KEY_WARNING else "Note"
        return [f"{kind}: the MoCo queue ({params.queue_size:,} keys) covers "
                f"{params.queue_size / keys_per_image / train_images:.0%} of the "
                f"{train_images:,} training images, so about {stale:.0%} of them meet their "
                "own key from the previous epoch among their negatives (MoCo's recipes: "
                "about 0.1%). If that matters here, lower method.mocov2.queue_size or train "
                "on more images."]

    @torch.no_grad()
    def target_embedding(self, images: Tensor, generator: torch.Generator) -> Tensor:
        def encode(batch: Tensor) -> Tensor:
            return head_in_float32(self.target_projector, self.target_backbone(batch))

        # Shuffle-BN (MoCo sec. 3.3) across processes; on one process BN already sees the
        # whole batch, so shuffling would change nothing.
        keys = (shuffled_forward(encode, images, generator) if self.shuffle_bn
                else encode(images))
        return F.normalize(keys.float(), dim=1)

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return info_nce(online, target, self.queue, self.temperature)

    @torch.no_grad()
    def after_step(self, targets: list[Tensor], progress: float) -> None:
        momentum = cosine_momentum(self.momentum, self.momentum_end, progress)
        self.update_target_network(momentum)
        # Keys enter the queue once per step, however many loss terms used them.
        self._enqueue(gather_all(torch.cat(targets)))

    def _enqueue(self, keys: Tensor) -> None:
        # A ring buffer with wrap-around: no constraint that the queue size divides the
        # number of keys per step, and no host sync for the pointer.
        size = self.queue.shape[0]
        positions = (self.queue_pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[positions] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + keys.shape[0]) % size)
