"""Augmentations on PIL images: one :class:`~mixmask.data.views.ViewConfig` view for
pretraining, and a fixed view for evaluation.

>>> view = view_transform(preset_views("cifar", 32)[0], *DATASET_STATS["cifar10"])
>>> tensor, (top, left, height, width), flipped = view(pil_image)   # [3, 32, 32]

The presets and the cycling rule for more views than a preset has are in
:mod:`mixmask.data.views`; :class:`mixmask.data.loaders.MultiViewDataset` draws N views
of each image with one :func:`view_transform` per view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from mixmask.data.views import AUGMENTATION_PRESETS, ViewConfig, preset_views

__all__ = [
    "AUGMENTATION_PRESETS",
    "INTERPOLATION",
    "RandomHorizontalFlipWithFlag",
    "RandomResizedCropWithBox",
    "ResizePadCropWithBox",
    "ViewTransform",
    "eval_transform",
    "preset_views",
    "view_transform",
]

Box = tuple[int, int, int, int]
# ViewConfig.interpolation -> torchvision's mode (PIL's filter on PIL images).
INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR,
                 "bicubic": T.InterpolationMode.BICUBIC}


class RandomResizedCropWithBox(T.RandomResizedCrop):
    """``T.RandomResizedCrop`` that also returns its box: ``(image, (top, left, height,
    width))`` in source pixels. Same draws from torch's global RNG (its ``get_params``),
    same resize."""

    def forward(self, img):
        box = self.get_params(img, self.scale, self.ratio)
        image = TF.resized_crop(img, *box, self.size, self.interpolation,
                                antialias=self.antialias)
        return image, box


class ResizePadCropWithBox:
    """PixMIM's conservative crop, as mmselfsup's
    ``configs/selfsup/pixmim/pixmim_vit-base-p16_8xb512-amp-coslr-300e_in1k.py`` has it:
    ``T.Resize(size)`` of the shorter side, then ``T.RandomCrop(size, padding,
    padding_mode=...)``, returning ``(image, (top, left, height, width))``. Same draws from
    torch's global RNG as that pair (``RandomCrop.get_params``), same pixels.

    The box is in source pixels, rounded: the crop's offset in the padded, resized image
    minus the padding, scaled back by the resize. It may reach up to ``padding`` resized
    pixels past the image's edges (negative top or left), where the crop shows padding.
    """

    def __init__(self, size: int, padding: int = 4, padding_mode: str = "reflect",
                 antialias: bool = True):
        self.size, self.padding, self.padding_mode = size, padding, padding_mode
        self.resize = T.Resize(size, antialias=antialias)

    def __call__(self, img: PIL.Image.Image) -> tuple[PIL.Image.Image, Box]:
        width, height = img.size
        resized = self.resize(img)
        resized_width, resized_height = resized.size
        padded = TF.pad(resized, self.padding, padding_mode=self.padding_mode)
        top, left, crop_height, crop_width = T.RandomCrop.get_params(padded,
                                                                      (self.size, self.size))
        image = TF.crop(padded, top, left, crop_height, crop_width)
        scale_y, scale_x = height / resized_height, width / resized_width
        box = (round((top - self.padding) * scale_y), round((left - self.padding) * scale_x),
               round(crop_height * scale_y), round(crop_width * scale_x))
        return image, box

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, padding={self.padding}, "
                f"padding_mode={self.padding_mode!r})")


class RandomHorizontalFlipWithFlag(T.RandomHorizontalFlip):
    """``T.RandomHorizontalFlip`` that also says whether it flipped: ``(image, flipped)``.
    Same draw from torch's global RNG (``torch.rand(1) < p``)."""

    def forward(self, img):
        if torch.rand(1) < self.p:
            return TF.hflip(img), True
        return img, False


class ViewTransform:
    """One augmented, normalised view of a PIL image and its geometry:
    ``view(image) -> (tensor [3, S, S], (top, left, height, width), flipped)``.

    The torchvision steps, in MoCo v2's (moco/main_moco.py) and solo-learn's BYOL order:
    crop, RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur),
    RandomSolarize, flip, ToTensor, Normalize (``transforms`` lists them). Ops whose
    probability is 0 are left out and draw nothing. The crop and the flip are
    :class:`RandomResizedCropWithBox` and :class:`RandomHorizontalFlipWithFlag`, which draw
    from torch's global RNG exactly as torchvision's ``RandomResizedCrop`` and
    ``RandomHorizontalFlip`` do, so under the same torch seed the tensor is that of a
    plain ``T.Compose`` of the same steps with those two. For ``view.crop == "padded"``
    the crop is :class:`ResizePadCropWithBox` (likewise equal to ``T.Resize`` then
    ``T.RandomCrop``). A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, view: ViewConfig, mean: Sequence[float], std: Sequence[float]):
        self.view = view
        self.crop: RandomResizedCropWithBox | ResizePadCropWithBox
        if view.crop == "padded":
            self.crop = ResizePadCropWithBox(view.image_size, view.padding, view.padding_mode,
                                             antialias=view.antialias)
        elif view.crop == "resized":
            self.crop = RandomResizedCropWithBox(
                view.image_size, scale=view.scale, ratio=view.ratio,
                interpolation=INTERPOLATION[view.interpolation], antialias=view.antialias)
        else:
            raise ValueError(f"ViewConfig.crop must be 'resized' or 'padded', got {view.crop!r}.")
        photometric: list[Callable] = []
        if view.jitter_p > 0:
            jitter = T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
            photometric.append(T.RandomApply([jitter], p=view.jitter_p))
        if view.grayscale_p > 0:
            photometric.append(T.RandomGrayscale(p=view.grayscale_p))
        if view.blur_p > 0:
            blur = T.GaussianBlur(view.kernel_size, sigma=view.blur_sigma)
            photometric.append(T.RandomApply([blur], p=view.blur_p))
        if view.solarize_p > 0:
            # PIL inverts uint8 pixels >= threshold; x / 255 >= t is x >= ceil(255 t).
            threshold = math.ceil(view.solarize_threshold * 255)
            photometric.append(T.RandomSolarize(threshold=threshold, p=view.solarize_p))
        self.photometric = photometric
        self.flip = RandomHorizontalFlipWithFlag(view.flip_p) if view.flip_p > 0 else None
        self.to_tensor = [T.ToTensor(), T.Normalize(mean, std)]

    @property
    def transforms(self) -> list[Callable]:
        """Every step in order (the crop and the flip being the recording ones)."""
        flip = [] if self.flip is None else [self.flip]
        return [self.crop, *self.photometric, *flip, *self.to_tensor]

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, Box, bool]:
        image, box = self.crop(image)
        for step in self.photometric:
            image = step(image)
        flipped = False
        if self.flip is not None:
            image, flipped = self.flip(image)
        for step in self.to_tensor:
            image = step(image)
        return image, tuple(int(value) for value in box), flipped

    def __repr__(self) -> str:
        steps = "".join(f"\n    {step}" for step in self.transforms)
        return f"{type(self).__name__}({steps}\n)"


def view_transform(view: ViewConfig, mean: Sequence[float], std: Sequence[float]
                   ) -> ViewTransform:
    """The PIL pipeline of one view: ``(tensor [3, S, S] normalised with mean and std,
    box (top, left, height, width) in source pixels, flipped)``; see
    :class:`ViewTransform`."""
    return ViewTransform(view, mean, std)


def eval_geometry(image_size: int, resize_from_larger: bool
                  ) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """The resize and centre crop of :func:`eval_transform` alone (PIL in, PIL out): where
    the robustness protocol applies its corruptions, as ImageNet-C corrupts 224 px centre
    crops (Hendrycks & Dietterich 2019, sec. 3)."""
    if resize_from_larger:
        return T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size)])
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])


def to_normalised_tensor(mean: Sequence[float], std: Sequence[float]
                         ) -> Callable[[PIL.Image.Image], torch.Tensor]:
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize_from_larger: bool
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """The deterministic view used by linear probes and k-NN.

    resize_from_larger: ImageNet-style resize to image_size / 0.875 (256 for 224) and
    centre crop; otherwise resize the shorter side to image_size (a no-op for images that
    already have it) and centre crop to a square.
    """
    return T.Compose([eval_geometry(image_size, resize_from_larger),
                      to_normalised_tensor(mean, std)])
