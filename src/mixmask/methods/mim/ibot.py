"""iBOT (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv
2111.07832, ICLR 2022): masked image modelling by self-distillation, as its reference runs
(bytedance/ibot ``main_ibot.py``: ``iBOTLoss`` and the training loop; ``models/head.py:
iBOTHead``; ``models/vision_transformer.py``; ``loader.py: ImageFolderMask``).

DINO on the cls token plus a masked-patch term (sec. 3.2, eq. 2-3). The teacher, an EMA copy
of the student ViT and head (``momentum`` -> ``momentum_end`` on a cosine; no drop-path, as
the reference builds it), sees the two global views whole. The student sees them with BEiT
block masks, its mask token in place of the masked patch embeddings (before the position
embedding: ``masked_embed``), and the local crops whole, cls only. With H DINO's centred,
sharpened cross-entropy (:mod:`mixmask.ops.losses.distillation`)::

    loss_cls   = mean over q in {1, 2}, v != q (globals and locals) of H(t_q^cls, s_v^cls)
    loss_patch = mean over q in {1, 2} and the images of
                 sum_i m_i H(t_q^i, s_q^i) / max(sum_i m_i, 1)     (masked patches i only)
    loss       = cls_loss_weight x loss_cls + patch_loss_weight x loss_patch

The patch term has its own centre, its own teacher-temperature warm-up and, unless shared,
its own last layer (prototypes); the last layers take no update in the first epoch(s).

Masks (``ImageFolderMask``, ``pred_shape='block'``): per image and global view one entry of
``mask_ratios`` is picked at random and the ratio drawn uniform in [r - var, r + var]; BEiT's
loop (:func:`~mixmask.ops.grid_masks.beit_block_mask`, blocks of at least (side // 3)^2
patches, aspect 0.3 to 1 / 0.3) masks up to floor(ratio x N) patches. Drawn on the host, as
the reference's loader does, from a checkpointed generator, so a resumed run draws the same
masks (about 40 us per mask at 14 x 14). The reference's loop budget is the real ratio x N
minus the count, ours its floor: the same final bound, a block area's upper bound at most one
patch lower.

Not kept: the reference decays ``masked_embed``; here ``mask_token`` is a token, without
weight decay (:func:`~mixmask.ops.optim.pretraining_groups`). With ``use_bn_in_head`` the
local crops' head BN sees their cls tokens only (the reference: all their tokens). The Swin
options (``pred_start_epoch``) and ``pred_shape='rand'`` are not implemented. Evaluation
reads the student's backbone (as DINO here); the reference evaluates the teacher's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.methods.common import (
    HostGenerator,
    check_unit_interval,
    cosine_momentum,
    ema_copy,
    ema_update,
)
from mixmask.methods.protocol import Method, StepOutput
from mixmask.methods.registry import register_method
from mixmask.methods.self_distillation import (
    SelfDistillationConfig,
    build_head,
    distillation_views,
    drop_last_layer_gradients,
    epoch_at,
    teacher_temperature_at,
    validate_self_distillation,
)
from mixmask.models.backbones import backbone_traits
from mixmask.models.heads import NormalizedLinear
from mixmask.ops.grid_masks import beit_block_mask, host_to_device
from mixmask.ops.losses.distillation import (
    distillation_cross_entropy,
    masked_token_mean,
    teacher_probabilities,
    teacher_temperature,
    updated_center,
)

# ImageFolderMask's pred_aspect_ratio (0.3, 1 / 0.3), fixed in main_ibot.py.
_MIN_ASPECT = 0.3


@dataclass
class IBOTConfig(SelfDistillationConfig):
    """Defaults: main_ibot.py's arguments, except the mask ratios (the README's runs). The
    README's ViT-S/16 run sets num_prototypes 8192, teacher_temperature 0.07,
    norm_last_layer false, shared_head true, local_crops 10, global_crop_scale [0.25, 1],
    local_crop_scale [0.05, 0.25] (``configs/imagenet/ibot_vit_small.yaml``)."""

    num_prototypes: int = 8192
    # main_ibot.py's default; the README's runs warm it up to 0.07.
    teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: int = 30
    momentum: float = 0.996
    global_crop_scale: tuple[float, float] = (0.14, 1.0)
    # The patch tokens' prototypes (patch_out_dim); 0 = num_prototypes. Either head shared
    # forces num_prototypes (the reference's pair of defaults: 8192 both).
    num_patch_prototypes: int = 0
    # The student's patch tokens through the cls token's last layer (main_ibot.py: false,
    # so they have their own; the README's runs: true).
    shared_head: bool = False
    # The teacher's patch tokens through its cls token's last layer (main_ibot.py: true).
    # With shared_head false, main_ibot.py's pair, the student's own patch prototypes learn
    # the teacher's cls prototypes of the patch tokens.
    shared_head_teacher: bool = True
    # The patch term's teacher temperature, warmed up per epoch from
    # warmup_teacher_patch_temperature over warmup_teacher_temperature_epochs.
    teacher_patch_temperature: float = 0.07
    warmup_teacher_patch_temperature: float = 0.04
    # The EMA momentum of the patch term's centre (center_momentum2).
    patch_center_momentum: float = 0.9
    # lambda1 and lambda2 of the paper.
    cls_loss_weight: float = 1.0
    patch_loss_weight: float = 1.0
    # Per image and global view one entry is picked, the ratio uniform in [r - var, r + var]
    # (pred_ratio, pred_ratio_var). The README's runs, the paper's setting: half the views
    # unmasked, the rest 10-50% masked; main_ibot.py's default is [0.3], [0].
    mask_ratios: tuple[float, ...] = (0.0, 0.3)
    mask_ratio_vars: tuple[float, ...] = (0.0, 0.2)


@register_method("ibot")
class IBOT(Method):
    config_class = IBOTConfig
    num_views = 2
    drops_gradients = True  # the last layers' in the first epoch(s)

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.epochs = config.train.epochs
        self.projector = build_head(params, self.feature_dim)
        patch_prototypes = params.num_patch_prototypes or params.num_prototypes
        # iBOTHead: the MLP is shared by all tokens; the patch tokens' own last layer
        # (last_layer2), or None when they use the cls token's.
        self.patch_prototypes = None if params.shared_head else NormalizedLinear(
            params.bottleneck_dim, patch_prototypes, train_gain=not params.norm_last_layer)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.feature_dim))  # masked_embed
        self.target_backbone = ema_copy(self.backbone)
        self.target_backbone.set_drop_path(0.0)
        self.target_projector = ema_copy(self.projector)
        self.target_patch_prototypes = None if params.shared_head_teacher else ema_copy(
            self.patch_prototypes)
        self.register_buffer("center", torch.zeros(1, params.num_prototypes))
        self.register_buffer("patch_center", torch.zeros(1, patch_prototypes))
        self.grid = self.backbone.grid_size[0]
        self.min_block = max(1, (self.grid // 3) ** 2)  # ImageFolderMask's (min(H, W) // 3)^2
        self.mask_generator = HostGenerator()

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        params, section = config.method.ibot, "method.ibot"
        if not backbone_traits(config.model.backbone).tokens:
            raise ConfigError(f"method 'ibot' masks patch tokens and needs a ViT (vit_tiny, "
                              f"vit_small, vit_base), got model.backbone={config.model.backbone}.")
        if config.model.global_pool != "token":
            raise ConfigError("method 'ibot' distils the cls token; set model.global_pool=token.")
        validate_self_distillation(params, section, config)
        for key in ("teacher_patch_temperature", "warmup_teacher_patch_temperature"):
            if (value := getattr(params, key)) <= 0:
                raise ConfigError(f"'{section}.{key}' must be positive, got {value}.")
        check_unit_interval(params, section, "patch_center_momentum")
        for key in ("num_patch_prototypes", "cls_loss_weight", "patch_loss_weight"):
            if (value := getattr(params, key)) < 0:
                raise ConfigError(f"'{section}.{key}' must be 0 or more, got {value}.")
        if params.shared_head and not params.shared_head_teacher:
            raise ConfigError(f"'{section}.shared_head' true needs shared_head_teacher true (the "
                              "reference's teacher would keep a patch layer it never updates).")
        patch = params.num_patch_prototypes
        if patch and patch != params.num_prototypes and (params.shared_head
                                                         or params.shared_head_teacher):
            raise ConfigError(f"'{section}.num_patch_prototypes' ({patch}) must be 0 or "
                              f"num_prototypes ({params.num_prototypes}) while a head is shared.")
        ratios, spreads = params.mask_ratios, params.mask_ratio_vars
        if not ratios or len(ratios) != len(spreads) or not all(
                0.0 <= var <= ratio and ratio + var < 1.0
                for ratio, var in zip(ratios, spreads, strict=True)):
            raise ConfigError(f"'{section}.mask_ratios' {list(ratios)} and mask_ratio_vars "
                              f"{list(spreads)} must be lists of one length with 0 <= var <= "
                              "ratio and ratio + var < 1.")

    def view_configs(self):
        return distillation_views(self.params, self.run_config)

    # -- masks ---------------------------------------------------------------------------
    def draw_mask_ratios(self, count: int, host: torch.Generator) -> Tensor:
        """[count] float64 on the host: ``ImageFolderMask.get_pred_ratio`` per mask."""
        host_tensor = {"dtype": torch.float64, "device": "cpu"}
        ratios = torch.tensor(self.params.mask_ratios, **host_tensor)
        spreads = torch.tensor(self.params.mask_ratio_vars, **host_tensor)
        entry = torch.randint(len(ratios), (count,), generator=host, device="cpu")
        uniform = torch.rand(count, generator=host, **host_tensor)
        return ratios[entry] + spreads[entry] * (2.0 * uniform - 1.0)

    def sample_masks(self, count: int, generator: torch.Generator,
                     device: torch.device) -> Tensor:
        """bool [count, N], True = masked: one block mask per (global view, image), from
        the host generator seeded by the step generator's seed."""
        host = self.mask_generator.get(generator)
        cells = self.grid * self.grid
        masks = torch.zeros(count, cells, dtype=torch.bool, device="cpu")
        for index, ratio in enumerate(self.draw_mask_ratios(count, host).tolist()):
            masked = math.floor(round(ratio * cells, 9))  # the reference stops at ratio x N
            if masked:
                # beit_block_mask's blocks are its kept cells: for k blocked cells it takes
                # mask_ratio 1 - k / N; its 1s are read as masked here (as SiameseIM).
                blocks = beit_block_mask(1, self.grid, 1.0 - masked / cells, generator=host,
                                         min_block_cells=self.min_block, min_aspect=_MIN_ASPECT)
                masks[index] = blocks.reshape(-1).bool()
        return host_to_device(masks, device)

    # -- the step --------------------------------------------------------------------------
    def _logits(self, head: nn.Module, patch_layer: nn.Module | None, tokens: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """(the cls token's bottleneck [B, bottleneck_dim], cls logits [B, K], patch logits
        [B, N, K_patch]) of tokens [B, 1 + N, D]: ``iBOTHead.forward``."""
        bottleneck = head.bottleneck(tokens)
        patch_layer = head.last_layer if patch_layer is None else patch_layer
        return (bottleneck[:, 0], head.last_layer(bottleneck[:, 0]),
                patch_layer(bottleneck[:, 1:]))

    def training_step(self, batch, generator, progress: float = 0.0) -> StepOutput:
        params = self.params
        size = batch.views[0].shape[0]
        global_views = torch.cat(batch.views[:2])  # one batch, as MultiCropWrapper runs them
        masks = self.sample_masks(2 * size, generator, global_views.device)
        with torch.no_grad():
            _, teacher_cls, teacher_patch = self._logits(
                self.target_projector, self.target_patch_prototypes,
                self.target_backbone.forward_tokens(global_views))
        tokens = self.backbone.forward_with_mask_token(global_views, masks, self.mask_token,
                                                       replace=True)
        embedding, student_cls, student_patch = self._logits(self.projector,
                                                             self.patch_prototypes, tokens)
        student_views = list(student_cls.chunk(2))
        if len(batch.views) > 2:  # the local crops: whole, cls only, in one batch
            local_cls = self.backbone.forward_tokens(torch.cat(batch.views[2:]))[:, 0]
            student_views += self.projector(local_cls).chunk(len(batch.views) - 2)

        temperature = params.student_temperature
        teacher_views = teacher_probabilities(
            teacher_cls, self.center, teacher_temperature_at(params, progress, self.epochs)
        ).chunk(2)
        loss_cls = torch.stack([
            distillation_cross_entropy(student, teacher_views[q], temperature).mean()
            for q in range(2) for v, student in enumerate(student_views) if v != q]).mean()
        patch_temperature = teacher_temperature(
            epoch_at(progress, self.epochs), start=params.warmup_teacher_patch_temperature,
            end=params.teacher_patch_temperature,
            warmup_epochs=params.warmup_teacher_temperature_epochs)
        token_losses = distillation_cross_entropy(
            student_patch, teacher_probabilities(teacher_patch, self.patch_center,
                                                 patch_temperature), temperature)
        # Both global views hold B images: the mean over the 2B images is the mean of the
        # two (q, q) terms.
        loss_patch = masked_token_mean(token_losses, masks).mean()
        weighted_cls = params.cls_loss_weight * loss_cls
        weighted_patch = params.patch_loss_weight * loss_patch
        loss = weighted_cls + weighted_patch
        logs = {"loss": loss.detach(), "loss_cls": weighted_cls.detach(),
                "loss_patch": weighted_patch.detach(), "masked": masks.float().mean()}
        # The centres' inputs. The patch logits are averaged over each image's tokens here,
        # then updated_center averages the rows (images) and the processes: iBOTLoss's
        # update_center order (with N tokens in every image, the same as one mean over all
        # B x N tokens).
        targets = [teacher_cls.float(), teacher_patch.float().mean(dim=1)]
        return StepOutput(loss, logs, self.backbone.pool(tokens[:size]).detach(),
                          embedding[:size].detach(), targets)

    def before_optimizer_step(self, progress: float) -> None:
        last_layers = [self.projector.last_layer]
        if self.patch_prototypes is not None:
            last_layers.append(self.patch_prototypes)
        drop_last_layer_gradients(last_layers, self.params, progress, self.epochs)

    @torch.no_grad()
    def after_optimizer_step(self, output: StepOutput, progress: float) -> None:
        params = self.params
        teacher_cls, teacher_patch_means = output.targets
        self.center.copy_(updated_center(self.center, teacher_cls, params.center_momentum))
        self.patch_center.copy_(updated_center(self.patch_center, teacher_patch_means,
                                               params.patch_center_momentum))
        momentum = cosine_momentum(params.momentum, params.momentum_end, progress)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
        if self.target_patch_prototypes is not None:
            ema_update(self.target_patch_prototypes, self.patch_prototypes, momentum)


__all__ = ["IBOT", "IBOTConfig"]
