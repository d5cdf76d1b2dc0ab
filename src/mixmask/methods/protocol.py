"""The one protocol between the engine and every method.

The engine knows no method: it builds the registered class of ``method.name``, asks it for
its views and parameter groups, and each step calls :meth:`Method.training_step`, before the
optimizer step :meth:`Method.before_optimizer_step` and after it
:meth:`Method.after_optimizer_step`. Evaluation calls
:meth:`Method.features`. A new method is one file::

    @dataclass
    class ToyConfig:
        hidden: int = 16

    @register_method("toy")
    class Toy(Method):
        config_class = ToyConfig
        num_views = 1

        def __init__(self, config, pixel_stats=None):
            super().__init__(config, pixel_stats)
            self.decoder = nn.Linear(self.feature_dim, 3 * 32 * 32)

        def training_step(self, batch, generator, progress=0.0):
            images = batch.views[0]
            features = self.backbone(images)
            loss = F.mse_loss(self.decoder(features), images.flatten(1))
            return StepOutput(loss, {"loss": loss.detach()}, features.detach())

plus its config in ``configs/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from mixmask.data.batch import Batch
from mixmask.data.views import preset_views
from mixmask.errors import ConfigError
from mixmask.models.backbones import build_backbone
from mixmask.ops.optim import pretraining_groups

if TYPE_CHECKING:
    from mixmask.config import Config
    from mixmask.data.views import ViewConfig


@dataclass(frozen=True)
class PixelStats:
    """Per-channel mean and std the views were normalised with (the training set's)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class StepOutput:
    """What a training step returns to the engine."""

    loss: Tensor
    # Scalars to log (tensors: read on the host only at logging steps).
    logs: dict[str, Tensor]
    # Pooled backbone features of the step's first view, detached: the online probe's
    # input (None: no probe for this method).
    features: Tensor | None = None
    # The online projector's output for those images, detached (Siamese methods; None
    # elsewhere): with ``features``, what the collapse monitor measures at logging steps.
    embedding: Tensor | None = None
    # What after_optimizer_step needs from this step (e.g. MoCo's keys for its queue),
    # detached: handed back explicitly instead of being stashed on the module.
    targets: list[Tensor] = field(default_factory=list)
    # Set by mixmask.train.step.training_step when it dropped this step's update (a non-finite
    # loss or gradient with skip_nonfinite).
    skipped: bool = False


@dataclass
class MaskedViews:
    """What a masked-image-modeling method sees and predicts for one batch, in the
    normalised pixel space, for pictures (``mixmask show-masks``, ``mixmask reconstruct``)."""

    # [B, 1, H, W] bool, True = a masked pixel.
    mask: Tensor
    # [B, C, H, W]: the encoder's input (MAE: the visible patches, the masked ones shown
    # at 0, the dataset mean; A2MIM: the mean-filled image).
    inputs: Tensor
    # [B, C, H, W]: what the loss regresses, as an image (the pixels, or PixMIM's low-pass).
    target: Tensor
    # [B, C, H, W]: the prediction as an image (MAE's norm_pix output un-normalised with
    # each target patch's mean and std, as MAE's visualisation notebook does).
    reconstruction: Tensor


class Method(nn.Module):
    """Base of every method. A subclass sets ``config_class`` (its ``method.<name>.*``
    keys), registers itself with :func:`mixmask.methods.registry.register_method`, and
    implements :meth:`training_step`; the rest has defaults.

    Constructor: ``(config, pixel_stats)``, the whole run config and the dataset's pixel
    statistics; the base sets ``self.params`` (the method's own ``method.<name>.*``
    section) and builds ``self.backbone`` (``model.*``, the backbone registry) and
    ``self.feature_dim``.
    """

    name: ClassVar[str]  # set by register_method
    config_class: ClassVar[type]
    # A dataclass of extra ``method.*`` keys shared by a family of methods (the Siamese
    # masking axis), or None.
    axis_config_class: ClassVar[type | None] = None
    # Views per image (count); their augmentation is data.augmentation's preset. A method
    # that takes any count (multi-crop) sets variable_views and reads data.num_views.
    num_views: ClassVar[int] = 2
    variable_views: ClassVar[bool] = False
    # before_optimizer_step sets some gradients to None for a while (DINO's frozen
    # prototypes): the engine then avoids torch's fused SGD, which cannot take them back.
    drops_gradients: ClassVar[bool] = False

    def __init__(self, config: Config, pixel_stats: PixelStats | None = None):
        super().__init__()
        self.run_config = config
        # This method's own section, method.<name>.* (whichever method is active; an
        # unregistered subclass, e.g. in a test, reads the active one).
        self.params = getattr(config.method, getattr(type(self), "name", config.method.name))
        self.pixel_stats = pixel_stats
        self.backbone, self.feature_dim = build_backbone(config.model,
                                                         image_size=config.data.image_size)

    # -- what the engine asks before training ----------------------------------------------
    @classmethod
    def validate_config(cls, config: Config) -> None:
        """Raise :class:`mixmask.errors.ConfigError` for settings this method cannot run,
        before any data loads. Subclasses call ``super().validate_config(config)``."""

        wanted = config.data.num_views
        if wanted and wanted != cls.num_views and not cls.variable_views:
            raise ConfigError(f"method '{config.method.name}' takes {cls.num_views} view(s) "
                              f"per image; data.num_views={wanted} cannot change that (0 = "
                              "the method's count).")

    @classmethod
    def data_warnings(cls, config: Config, train_images: int) -> list[str]:
        """Warnings about settings that run but fit the training set badly (said once at
        the start; the engine knows the set's size only after loading it)."""
        return []

    def view_configs(self) -> list[ViewConfig]:
        """The augmentation of each view the method needs (``num_views`` views, or
        ``data.num_views`` for a method with ``variable_views``, of the
        ``data.augmentation`` preset at ``data.image_size``)."""

        data = self.run_config.data
        return preset_views(data.augmentation, data.image_size, data.num_views or self.num_views)

    def parameter_groups(self, optimizer: str) -> list[dict[str, Any]]:
        """Parameter groups for ``train.optimizer`` (:func:`mixmask.ops.optim.build_optimizer`),
        by :func:`mixmask.ops.optim.pretraining_groups`. A method may add ``lr_scale`` per
        group."""
        return pretraining_groups(optimizer, list(self.named_parameters()))

    # -- evaluation ------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        """Pooled representation [B, D] for kNN, linear probes and the online probe."""
        return self.backbone(images)

    def masked_views(self, images: Tensor, generator: torch.Generator) -> MaskedViews | None:
        """A masked-image-modeling method's mask, input, target and prediction for
        ``images`` (one draw of its masking from ``generator``); None for the others
        (the Siamese methods draw their masking axis instead)."""
        return None

    # -- each step ------------------------------------------------------------------------
    def training_step(self, batch: Batch, generator: torch.Generator,
                      progress: float = 0.0) -> StepOutput:
        """The loss of one batch. ``generator`` lives on the batch's device (masks, mixes);
        ``progress`` in [0, 1] is the share of training done (schedules)."""
        raise NotImplementedError

    def before_optimizer_step(self, progress: float) -> None:
        """After the backward and the gradient clipping, before ``optimizer.step()``: a
        method may drop gradients here (DINO's last layer, frozen in the first epoch)."""

    def after_optimizer_step(self, output: StepOutput, progress: float) -> None:
        """After ``optimizer.step()``: EMA targets, queues (from ``output.targets``)."""

    def forward(self, batch: Batch, generator: torch.Generator,
                progress: float = 0.0) -> StepOutput:
        # The training step is the forward, so DDP's gradient hooks see the whole of it.
        return self.training_step(batch, generator, progress)
