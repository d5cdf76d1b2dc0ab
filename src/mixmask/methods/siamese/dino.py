"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv 2104.14294) as a Siamese base, as its reference runs (facebookresearch/dino
``main_dino.py``: ``DINOLoss``, ``MultiCropWrapper``, ``cancel_gradients_last_layer``).

The student (backbone + :class:`~mixmask.models.heads.DINOHead`) sees every view; the
teacher, its EMA copy (``momentum`` -> ``momentum_end`` on a cosine), sees only the two
global views, in one batch as ``MultiCropWrapper`` runs them. The loss is the
cross-entropy between the teacher's centred, sharpened softmax of one global view and the
student's softmax of every other view, averaged over the 2 x (V - 1) pairs (Algorithm 1;
:mod:`mixmask.ops.losses.distillation`); the centre follows the teacher's mean output
after each step; the prototypes take no update in the first epoch(s).

The two global views are the Siamese base's pair, so the masking axis applies to the
student's global views (ours, not DINO's): a mixed student view is scored against the
teacher's clean other global view and weighted as in every base. The local crops
(``local_crops``, multi-crop) go through the student only, in one forward (BN statistics
over the local batch, as ``MultiCropWrapper`` groups the crops of one size)::

    loss = (2 x base + sum_{l local} sum_{q global} H(t_q, s_l)) / (2 + 2 K)

where ``base`` is the base's mean of the two global directions (with the axis's terms).

Evaluation reads the student's backbone (solo-learn's choice); DINO's own evaluation
scripts read the teacher's (``--checkpoint_key teacher``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixmask.errors import ConfigError
from mixmask.methods.common import cosine_momentum, head_in_float32
from mixmask.methods.registry import register_method
from mixmask.methods.self_distillation import (
    SelfDistillationConfig,
    build_head,
    distillation_views,
    drop_last_layer_gradients,
    teacher_temperature_at,
    validate_self_distillation,
)
from mixmask.methods.siamese.base import Embedding, SiameseMethod
from mixmask.ops.losses.distillation import (
    distillation_cross_entropy,
    teacher_probabilities,
    updated_center,
)


@dataclass
class DINOConfig(SelfDistillationConfig):
    """DINO's keys: :class:`~mixmask.methods.self_distillation.SelfDistillationConfig`."""


@register_method("dino")
class DINO(SiameseMethod):
    config_class = DINOConfig
    symmetric = True
    # Algorithm 1 averages the two teacher views' terms.
    symmetric_reduction = "mean"
    drops_gradients = True  # the prototypes' in the first epoch(s)

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.epochs = config.train.epochs
        # The whole head (MLP, bottleneck, prototypes) is "the projector": the teacher
        # copies all of it.
        self.projector = build_head(params, self.feature_dim)
        self.build_target_network()
        # The reference builds its teacher without stochastic depth (main_dino.py: the
        # student gets drop_path_rate, the teacher not); a deep copy would inherit it.
        if hasattr(self.target_backbone, "set_drop_path"):
            self.target_backbone.set_drop_path(0.0)
        self.register_buffer("center", torch.zeros(1, params.num_prototypes))
        # Set from progress at the start of each step (DINO: per epoch).
        self.current_teacher_temperature = params.warmup_teacher_temperature

    @classmethod
    def validate_config(cls, config) -> None:
        if config.data.num_views not in (0, 2):
            raise ConfigError(f"DINO takes 2 global views (data.num_views 0 or 2, got "
                              f"{config.data.num_views}); ask for local crops with "
                              "method.dino.local_crops.")
        super().validate_config(config)
        validate_self_distillation(config.method.dino, "method.dino", config)

    def view_configs(self):
        return distillation_views(self.params, self.run_config)

    # -- the base's ingredients ----------------------------------------------------------
    def embed(self, images: Tensor) -> Embedding:
        """Student: features, the normalised bottleneck (what the collapse monitor reads),
        the prototype logits."""
        features = self.backbone(images)
        bottleneck = head_in_float32(self.projector.bottleneck, features)
        return Embedding(features, bottleneck, head_in_float32(self.projector.last_layer,
                                                               bottleneck))

    @torch.no_grad()
    def target_embeddings(self, views, indices, generator):
        """The teacher's logits of the global views, both in one batch (BN over both)."""
        logits = head_in_float32(self.target_projector,
                                 self.target_backbone(torch.cat([views[0], views[1]])))
        first, second = logits.float().chunk(2)
        return {index: (first, second)[index] for index in indices}

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        probabilities = teacher_probabilities(target, self.center,
                                              self.current_teacher_temperature)
        return distillation_cross_entropy(online, probabilities,
                                          self.params.student_temperature)

    # -- the step --------------------------------------------------------------------------
    def training_step(self, batch, generator, progress: float = 0.0):
        self.current_teacher_temperature = teacher_temperature_at(self.params, progress,
                                                                  self.epochs)
        output = super().training_step(batch, generator, progress)
        local_views = batch.views[2:]
        if not local_views:
            return output
        local_logits = self.embed(torch.cat(local_views)).output.chunk(len(local_views))
        # Each teacher view's centred, sharpened softmax once, for all the local crops.
        teachers = [teacher_probabilities(target, self.center, self.current_teacher_temperature)
                    for target in output.targets]
        temperature = self.params.student_temperature
        local_total = sum(distillation_cross_entropy(student, teacher, temperature).mean()
                          for student in local_logits for teacher in teachers)
        pairs = 2 + 2 * len(local_views)
        output.loss = (2 * output.loss + local_total) / pairs
        output.logs["loss_local"] = (local_total / (2 * len(local_views))).detach()
        output.logs["loss"] = output.loss.detach()
        return output

    def before_optimizer_step(self, progress: float) -> None:
        drop_last_layer_gradients([self.projector.last_layer], self.params, progress,
                                  self.epochs)

    @torch.no_grad()
    def after_step(self, targets: list[Tensor], progress: float) -> None:
        self.center.copy_(updated_center(self.center, torch.cat(targets),
                                         self.params.center_momentum))
        self.update_target_network(cosine_momentum(self.params.momentum,
                                                   self.params.momentum_end, progress))
