"""Backbone weights for other libraries: ``mixmask export RUN --format F --out FILE``.

Only the pretrained backbone leaves: no projector, predictor or EMA/target copy (MoCo's
conversion likewise takes the query encoder, ``encoder_q``, only). No tensor is changed,
only renamed, so what a downstream model loads is bit-for-bit what was pretrained.

- ``torchvision``: a ``torch.save`` state dict with torchvision's names (ours already are:
  :mod:`mixmask.models.backbones` builds torchvision ``ResNet`` instances)::

      m = torchvision.models.resnet50(); m.fc = nn.Identity()
      m.load_state_dict(torch.load("r50.pt", weights_only=True))   # strict

- ``timm``: the same file layout; timm's ResNet uses torchvision's names for conv1, bn1,
  layer1-4 and calls its classifier ``fc``, which ``num_classes=0`` makes an identity::

      m = timm.create_model("resnet50", num_classes=0)
      m.load_state_dict(torch.load("r50.pt", weights_only=True))   # strict

- ``detectron2``: MoCo's ``detection/convert-pretrain-to-detectron2.py`` (facebookresearch/
  moco, MIT): a pickle ``{"model": {name: numpy array}, "__author__": ...,
  "matching_heuristics": True}`` with detectron2's ResNet names (``stem.conv1``,
  ``res2``-``res5``, ``convN.norm``, ``shortcut``). See docs/transfer.md and
  configs/transfer/detectron2/. detectron2's core has no other backbone family this conversion
  could write (a ConvNeXt or ViT run is refused, pointing to the formats that hold it).

- ``vitdet``: ViTs (the registry's token backbones, in timm's layout with a cls token) for
  detectron2's ViTDet (Li et al., arXiv 2203.16527; ``projects/ViTDet``), which loads
  ``train.init_checkpoint`` as it loads MAE's: a ``torch.save`` of ``{"model": {timm
  VisionTransformer name: tensor}, "matching_heuristics": True, "__author__": ...}``.
  DetectionCheckpointer aligns names by suffix (``blocks.0.attn.qkv.weight`` ->
  ``backbone.net.blocks.0.attn.qkv.weight``); ViTDet drops ``pos_embed``'s cls row
  (``pretrain_use_cls_token=True``) and interpolates the rest to its grid. The same
  ``model`` loads strictly into timm's ``VisionTransformer(..., num_classes=0)``.

- ``safetensors``: any registered backbone, our names, with metadata saying what it is
  (:mod:`mixmask.runs.export_safetensors`; reading it runs no code) and the same as JSON
  beside it; :func:`load_safetensors_backbone` rebuilds the backbone from the file alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mixmask.models.backbones import BackboneTraits, backbone_names, backbone_traits
from mixmask.runs.export_safetensors import (
    ExportError,
    check_matches_builder,
    load_safetensors_backbone,
    resolve_image_size,
    safetensors_bytes,
)

__all__ = ["EXPORT_FORMATS", "ExportError", "backbone_state", "detectron2_state",
           "export_backbone", "load_safetensors_backbone", "torchvision_convnext_state"]

EXPORT_FORMATS = ("torchvision", "timm", "detectron2", "vitdet", "safetensors")

# The backbones a format can hold: those whose traits name a torchvision ResNet depth (the
# registry names them as torchvision and timm do; detectron2's MODEL.RESNETS.DEPTH).
_BOTTLENECK_DEPTHS = (50,)

# torchvision's ImageNet normalisation, the statistics MoCo's detectron2 configs put in
# MODEL.PIXEL_MEAN / PIXEL_STD (x255, RGB).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_STEM_SNIPPET = ("m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False); "
                      "m.maxpool = nn.Identity(); m.fc = nn.Identity()")

# What ViTDet loads: timm's ViT names with a cls token (its pretrain_use_cls_token=True).
_VITDET_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight")


def backbone_state(method: nn.Module) -> dict[str, Tensor]:
    """The backbone's own ``state_dict`` of a built method: ``method.backbone`` (the online
    / query network, not ``target_backbone``, the EMA copy), without heads."""
    if isinstance(method, nn.parallel.DistributedDataParallel | nn.DataParallel):
        method = method.module
    backbone = getattr(method, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ExportError(f"{type(method).__name__} has no 'backbone' network to export.")
    # torch.compile(module) wraps it (keys gain '_orig_mod.'); the engine compiles in place,
    # but a user's own wrapped backbone should export the same names.
    backbone = getattr(backbone, "_orig_mod", backbone)
    return dict(backbone.state_dict())


def export_backbone(backbone_state: dict[str, Tensor], model_config: Any, fmt: str,
                    out: str | Path, *, pixel_stats: Any = None,
                    image_size: int | None = None) -> dict[str, Any]:
    """Write ``backbone_state`` (of a backbone built from ``model_config``, a
    :class:`mixmask.config.ModelConfig`) to ``out`` in format ``fmt``, atomically.

    ``pixel_stats`` (optional, :class:`mixmask.methods.PixelStats`): the normalisation
    the run pretrained with; detectron2's and ViTDet's notes then give the pixel mean/std
    to match. ``image_size`` (optional): the run's ``data.image_size``, which a token
    model's position embeddings depend on; None: the config's if it has one, else what
    the weights show (a ViT's patch grid). The safetensors metadata records it.

    Returns ``{"format", "target", "tensors", "out", "notes"}``: the model the file loads
    into, how many tensors it holds, its path, and sentences on how to load it.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}.")
    if fmt == "safetensors":
        return _export_safetensors(backbone_state, model_config, Path(out), image_size)
    if fmt == "vitdet":
        return _export_vitdet(backbone_state, model_config, Path(out), image_size, pixel_stats)
    name, stem, width = model_config.backbone, model_config.stem, float(model_config.width)
    traits = backbone_traits(name)
    depth = traits.torchvision_resnet_depth
    if not depth and fmt == "timm" and traits.timm_name:
        return _export_timm_native(backbone_state, model_config, Path(out))
    if not depth and fmt == "torchvision" and traits.torchvision_name:
        return _export_torchvision_convnext(backbone_state, model_config, Path(out))
    if not depth and fmt == "detectron2":
        raise ExportError(_detectron2_refusal(name, traits))
    if not depth:
        exportable = [item for item in backbone_names()
                      if backbone_traits(item).torchvision_resnet_depth
                      or (fmt == "timm" and backbone_traits(item).timm_name)
                      or (fmt == "torchvision" and backbone_traits(item).torchvision_name)]
        raise ExportError(f"{fmt} export holds {', '.join(exportable)}; this run's "
                          f"model.backbone is {name!r}.")
    if width != 1.0:
        raise ExportError(f"{fmt}'s {name} has the standard channel counts (model.width=1.0); "
                          f"this run's backbone has model.width={width:g}, so its weights do "
                          "not fit it.")
    if stem not in ("cifar", "imagenet"):
        raise ExportError(f"model.stem must be 'cifar' or 'imagenet' to export; got {stem!r}.")
    if fmt == "detectron2" and stem == "cifar":
        # detectron2's BasicStem is conv1 7x7/2 + max-pool 3x3/2 (stride 4); it has no place
        # for the CIFAR stem's 3x3/1 conv and would also see the stages at 4x the stride.
        raise ExportError("detectron2's ResNet stem is a 7x7 stride-2 conv with a max-pool, so "
                          "this run's CIFAR stem (3x3 stride 1, no max-pool) does not fit it; "
                          "pretrain with model.stem=imagenet to transfer to detectron2.")
    check_matches_builder(backbone_state, model_config)
    out = Path(out)

    if fmt == "detectron2":
        model = detectron2_state(backbone_state)
        payload = {"model": model, "__author__": "mixmask", "matching_heuristics": True}
        _write_atomically(out, lambda handle: pickle.dump(payload, handle))
        target = (f"detectron2 R{depth}-C4 (MoCo conversion)" if depth in _BOTTLENECK_DEPTHS
                  else f"detectron2 R{depth} backbone (MoCo conversion)")
        return {"format": fmt, "target": target, "tensors": len(model), "out": str(out),
                "notes": _detectron2_notes(depth, pixel_stats)}

    state = {key: tensor.detach().cpu() for key, tensor in backbone_state.items()}
    _write_atomically(out, lambda handle: torch.save(state, handle))
    if fmt == "torchvision":
        target = f"torchvision.models.{name}()"
        model_line = f"m = torchvision.models.{name}()"
    else:
        target = f"timm.create_model('{name}', num_classes=0)"
        model_line = f"m = {target}"
    return {"format": fmt, "target": target, "tensors": len(state), "out": str(out),
            "notes": _classifier_notes(fmt, name, stem, model_line, out)}


def detectron2_state(backbone_state: dict[str, Tensor]) -> dict[str, Any]:
    """torchvision ResNet names -> detectron2's, values as numpy arrays (MoCo's
    ``convert-pretrain-to-detectron2.py``): ``conv1``/``bn1`` -> ``stem.conv1``/
    ``stem.conv1.norm``; ``layerN`` -> ``res(N+1)``; ``bnK`` -> ``convK.norm``;
    ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``.

    Every key is kept, BN ``num_batches_tracked`` included, as MoCo's script keeps them:
    detectron2's BatchNorm/SyncBN load them, its FrozenBN has none and logs them unused.
    """
    converted = {}
    for key, tensor in backbone_state.items():
        if tensor.dtype == torch.bfloat16:
            raise ExportError(f"{key} is bfloat16, which numpy (detectron2's format) cannot "
                              "hold; export a float32 checkpoint.")
        converted[_detectron2_name(key)] = tensor.detach().cpu().numpy()
    return converted


def _detectron2_name(key: str) -> str:
    if not key.startswith("layer"):
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for index in (1, 2, 3):
        key = key.replace(f"bn{index}", f"conv{index}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _export_timm_native(backbone_state: dict[str, Tensor], model_config: Any, out: Path
                        ) -> dict[str, Any]:
    """A backbone built as timm builds it (ConvNeXt: the same class and names): its state
    as it is, for ``timm.create_model(name, num_classes=0)``."""
    name, stem = model_config.backbone, model_config.stem
    check_matches_builder(backbone_state, model_config)
    state = {key: tensor.detach().cpu() for key, tensor in backbone_state.items()}
    _write_atomically(out, lambda handle: torch.save(state, handle))
    target = f"timm.create_model('{name}', num_classes=0)"
    load = f"m.load_state_dict(torch.load('{out}', weights_only=True))"
    notes = ["The file holds the backbone with its head's LayerNorm (num_classes=0: no "
             "classifier; pretraining has none)."]
    if stem == "cifar":
        # Our CIFAR stem (mixmask.models.convnext.build_convnext); tests/test_convnext.py
        # loads it this way.
        width = state["stem.0.weight"].shape[0]
        notes.append("The run used our CIFAR stem (a 3x3 stride-1 conv), so replace it before "
                     f"a strict load: m = {target}; m.stem[0] = nn.Conv2d(3, {width}, 3, 1, 1); "
                     f"{load}.")
    else:
        notes.append(f"Load it strictly: m = {target}; {load}.")
    notes.append("To fine-tune with a new classifier, load as above, then m.reset_classifier(N).")
    return {"format": "timm", "target": target, "tensors": len(state), "out": str(out),
            "notes": notes}


def torchvision_convnext_state(backbone_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ConvNeXt names -> torchvision's (``torchvision.models.convnext``): the stem is
    ``features.0``, stage i's blocks ``features.{2i+1}`` (``conv_dw``, ``norm``, ``mlp.fc1``,
    ``mlp.fc2`` -> ``block.0/2/3/5``; ``gamma`` [C] -> ``layer_scale`` [C, 1, 1]), stage i's
    downsampling ``features.{2i}``, the head's LayerNorm ``classifier.0``."""
    renamed = {}
    for key, tensor in backbone_state.items():
        parts = key.split(".")
        if parts[0] == "stem":
            new = f"features.0.{parts[1]}.{parts[2]}"
        elif parts[0] == "head":
            new = f"classifier.0.{parts[2]}"
        elif parts[2] == "downsample":
            new = f"features.{2 * int(parts[1])}.{parts[3]}.{parts[4]}"
        else:  # stages.i.blocks.j.<part>
            block = f"features.{2 * int(parts[1]) + 1}.{parts[3]}"
            part = ".".join(parts[4:])
            if part == "gamma":
                renamed[f"{block}.layer_scale"] = tensor.view(-1, 1, 1)
                continue
            inner = {"conv_dw": 0, "norm": 2, "mlp.fc1": 3, "mlp.fc2": 5}[part.rpartition(".")[0]]
            new = f"{block}.block.{inner}.{parts[-1]}"
        renamed[new] = tensor
    return renamed


def _export_torchvision_convnext(backbone_state: dict[str, Tensor], model_config: Any,
                                 out: Path) -> dict[str, Any]:
    name, stem = model_config.backbone, model_config.stem
    check_matches_builder(backbone_state, model_config)
    state = {key: tensor.detach().cpu()
             for key, tensor in torchvision_convnext_state(backbone_state).items()}
    _write_atomically(out, lambda handle: torch.save(state, handle))
    target = f"torchvision.models.{name}()"
    load = f"m.load_state_dict(torch.load('{out}', weights_only=True))"
    notes = ["The file holds the backbone with the head's LayerNorm (no classifier: "
             "pretraining has none)."]
    replace = "m.classifier[2] = nn.Identity()"
    if stem == "cifar":
        width = state["features.0.0.weight"].shape[0]
        replace += f"; m.features[0][0] = nn.Conv2d(3, {width}, 3, 1, 1)"
        notes.append("The run used our CIFAR stem (a 3x3 stride-1 conv).")
    notes.append(f"Load it strictly: m = {target}; {replace}; {load}.")
    return {"format": "torchvision", "target": target, "tensors": len(state), "out": str(out),
            "notes": notes}


def _classifier_notes(fmt: str, name: str, stem: str, model_line: str, out: Path) -> list[str]:
    load = f"m.load_state_dict(torch.load('{out}', weights_only=True))"
    notes = ["The file holds the backbone only (no classifier: pretraining has none)."]
    if stem == "cifar":
        # Our CIFAR stem (mixmask.models.backbones.build_resnet): Conv2d(3, 64, 3, stride 1,
        # padding 1, bias=False) and no max-pool; tests/test_export.py loads it this way.
        notes.append("The run used the CIFAR stem (3x3 stride-1 conv1, no max-pool), so "
                     f"replace the stem before a strict load: {model_line}; "
                     f"{CIFAR_STEM_SNIPPET}; {load}.")
    elif fmt == "torchvision":
        notes.append(f"Load it strictly with fc replaced: {model_line}; m.fc = nn.Identity(); "
                     f"{load}.")
    else:
        notes.append(f"Load it strictly: {model_line}; {load}.")
    if fmt == "torchvision":
        notes.append("To fine-tune with a new classifier, load with strict=False into "
                     f"torchvision.models.{name}(num_classes=N): only fc.weight and fc.bias "
                     "are reported missing.")
    else:
        notes.append("To fine-tune with a new classifier, load as above, then "
                     "m.reset_classifier(N).")
    return notes


def _detectron2_notes(depth: int, pixel_stats: Any) -> list[str]:
    if depth in _BOTTLENECK_DEPTHS:
        notes = ["Fine-tune it with configs/transfer/detectron2/*_moco.yaml and MODEL.WEIGHTS "
                 "set to this "
                 "file; they set INPUT.FORMAT RGB and MODEL.RESNETS.STRIDE_IN_1X1 False "
                 "(torchvision's bottleneck strides in the 3x3 conv).",
                 "matching_heuristics=True lets detectron2 map res5.* onto the C4 ROI head's "
                 "roi_heads.res5.* (suffix matching, as for MoCo's conversion)."]
    else:
        # Res5ROIHeads._build_res5_block always builds BottleneckBlock stages, while
        # build_resnet_backbone builds BasicBlock stages for DEPTH 18/34.
        notes = [f"Use it with MODEL.RESNETS.DEPTH {depth}, RES2_OUT_CHANNELS 64, INPUT.FORMAT "
                 "RGB and an FPN backbone: the C4 configs' res5 ROI head is always bottleneck "
                 "blocks, so res5.* would not load there."]
    notes.append("BN num_batches_tracked counters are kept, as MoCo's conversion keeps every "
                 "key; with FrozenBN detectron2 logs them as unused.")
    if pixel_stats is not None:
        mean, std, imagenet = _pixels_x255(pixel_stats)
        if imagenet:
            notes.append(f"The run normalised with ImageNet's statistics: MODEL.PIXEL_MEAN "
                         f"{mean} and PIXEL_STD {std}, as in "
                         "configs/transfer/detectron2/*_moco.yaml.")
        else:
            notes.append(f"The run normalised with its own statistics: set MODEL.PIXEL_MEAN "
                         f"{mean} and MODEL.PIXEL_STD {std} (RGB, x255) to match.")
    return notes


def _pixels_x255(pixel_stats: Any) -> tuple[list[float], list[float], bool]:
    """The run's normalisation as detectron2 takes it (RGB, x255), and whether it is
    ImageNet's."""
    mean = [round(255 * value, 3) for value in pixel_stats.mean]
    std = [round(255 * value, 3) for value in pixel_stats.std]
    imagenet = (tuple(pixel_stats.mean), tuple(pixel_stats.std)) == (_IMAGENET_MEAN,
                                                                      _IMAGENET_STD)
    return mean, std, imagenet


def _detectron2_refusal(name: str, traits: BackboneTraits) -> str:
    resnets = ", ".join(item for item in backbone_names()
                        if backbone_traits(item).torchvision_resnet_depth)
    if traits.tokens:
        instead = "--format vitdet (detectron2's ViTDet) or --format safetensors"
    elif traits.timm_name:
        instead = "--format safetensors or --format timm"
    else:
        instead = "--format safetensors"
    return (f"detectron2's core has no {name} backbone: the conversion writes its ResNet "
            f"names (stem, res2-res5), the only layout it has, for {resnets}; export this "
            f"run with {instead} instead.")


# -- vitdet ----------------------------------------------------------------------------------
def _export_vitdet(backbone_state: dict[str, Tensor], model_config: Any, out: Path,
                   image_size: int | None, pixel_stats: Any) -> dict[str, Any]:
    """timm's ViT state as it is, in the checkpoint layout ViTDet's configs load."""
    name = model_config.backbone
    if not backbone_traits(name).tokens:
        holds = [item for item in backbone_names() if backbone_traits(item).tokens]
        raise ExportError(f"vitdet export holds the ViTs ({', '.join(holds)}); this run's "
                          f"model.backbone is {name!r}, so export it with --format "
                          "safetensors instead.")
    lacking = [key for key in _VITDET_KEYS if key not in backbone_state]
    if lacking:
        raise ExportError(f"ViTDet loads timm's ViT names with a cls token "
                          f"(pretrain_use_cls_token=True); this {name}'s weights have no "
                          f"{lacking[0]}.")
    if out.suffix == ".pkl":
        raise ExportError(f"detectron2 opens a .pkl file as a plain pickle, which this "
                          f"torch.save file is not; name it {out.with_suffix('.pth').name}.")
    size = resolve_image_size(backbone_state, model_config, image_size)
    reference = check_matches_builder(backbone_state, model_config, size)
    model = {key: tensor.detach().cpu() for key, tensor in backbone_state.items()}
    payload = {"model": model, "matching_heuristics": True, "__author__": "mixmask"}
    _write_atomically(out, lambda handle: torch.save(payload, handle))
    patch = model["patch_embed.proj.weight"]
    shape = {"img_size": size or 224,  # None: the builder's default, which the check passed
             "patch_size": patch.shape[-1], "embed_dim": patch.shape[0],
             "depth": len(reference.blocks), "num_heads": reference.blocks[0].attn.num_heads}
    target = (f"ViTDet's ViT (embed_dim {shape['embed_dim']}, depth {shape['depth']}, "
              f"num_heads {shape['num_heads']}, patch_size {shape['patch_size']})")
    return {"format": "vitdet", "target": target, "tensors": len(model), "out": str(out),
            "notes": _vitdet_notes(shape, out, pixel_stats,
                                   getattr(model_config, "global_pool", "token"))}


def _vitdet_notes(shape: dict[str, int], out: Path, pixel_stats: Any,
                  global_pool: str) -> list[str]:
    net = "; ".join(f"model.backbone.net.{key} = {shape[key]}"
                    for key in ("embed_dim", "depth", "num_heads", "patch_size"))
    notes = [f"In a ViTDet config (detectron2's projects/ViTDet): train.init_checkpoint = "
             f"'{out}'; {net}; model.backbone.net.pretrain_img_size = {shape['img_size']} "
             "(the run's image size, so that pos_embed's shape matches).",
             "detectron2 aligns the names by suffix (matching_heuristics: blocks.* -> "
             "backbone.net.blocks.*), drops pos_embed's cls row (pretrain_use_cls_token=True) "
             "and interpolates the rest to its grid; cls_token and the final norm are "
             "reported unused, as for MAE's checkpoints (keep a .pth name: detectron2 opens "
             ".pkl files as plain pickles)."]
    patch = shape["patch_size"]
    if patch != 16:
        notes.append(f"ViTDet's configs assume 16 px patches (model.backbone.scale_factors "
                     f"4, 2, 1, 0.5 give p2-p5 at strides 4-32); with {patch} px patches they "
                     f"give strides {patch / 4:g}-{2 * patch}, so change scale_factors and the "
                     "heads' in_features, or pretrain with model.patch_size=16.")
    if pixel_stats is None:
        notes.append("model.pixel_mean and model.pixel_std (RGB, x255) must be the run's "
                     "normalisation: ViTDet's configs use ImageNet's, [123.675, 116.28, "
                     "103.53] and [58.395, 57.12, 57.375], right only for a run on them.")
    else:
        mean, std, imagenet = _pixels_x255(pixel_stats)
        which = "ImageNet's statistics, as ViTDet's configs" if imagenet else "its own statistics"
        notes.append(f"The run normalised with {which}: model.pixel_mean = {mean}, "
                     f"model.pixel_std = {std} (RGB, x255; model.input_format = 'RGB').")
    timm_vit = ", ".join(f"{key}={shape[key]}" for key in
                         ("img_size", "patch_size", "embed_dim", "depth", "num_heads"))
    notes.append(f"The same 'model' loads strictly into timm: VisionTransformer({timm_vit}, "
                 f"class_token=True, global_pool='{global_pool}', num_classes=0, "
                 "norm_layer=partial(nn.LayerNorm, eps=1e-6)).load_state_dict(torch.load("
                 f"'{out}', weights_only=True)['model']).")
    return notes


# -- safetensors -----------------------------------------------------------------------------
def _export_safetensors(backbone_state: dict[str, Tensor], model_config: Any, out: Path,
                        image_size: int | None) -> dict[str, Any]:
    """The safetensors file (metadata included) and its description as JSON beside it."""
    description_path = out.with_suffix(".json")
    if description_path == out:
        raise ExportError(f"--out {out} would be overwritten by its own JSON description; "
                          f"name it {out.with_suffix('.safetensors').name}.")
    data, description, count = safetensors_bytes(backbone_state, model_config, image_size)
    _write_atomically(out, lambda handle: handle.write(data))
    text = json.dumps(description, indent=2) + "\n"
    _write_atomically(description_path, lambda handle: handle.write(text.encode()))
    name = description["architecture"]
    size = description["image_size"] or "not recorded"
    notes = [f"{description_path} holds the description the file's metadata carries: {name}, "
             f"stem {description['stem']}, width {description['width']:g}, patch size "
             f"{description['patch_size']}, image size {size}.",
             "Load it with mixmask: from mixmask.runs.export import load_safetensors_backbone; "
             f"backbone, description = load_safetensors_backbone('{out}') (strict); or the "
             f"tensors alone: safetensors.torch.load_file('{out}'); reading runs no code."]
    if description["image_size"] is None and backbone_traits(name).token_stride is not None:
        notes.append("The input size is not recorded (the weights do not fix it): pass the "
                     "run's data.image_size as load_safetensors_backbone(..., image_size=N).")
    return {"format": "safetensors",
            "target": f"mixmask's {name} (load_safetensors_backbone; metadata included)",
            "tensors": count, "out": str(out), "notes": notes}


def _write_atomically(out: Path, serialise: Callable[[io.BufferedIOBase], None]) -> None:
    """Serialise into memory, write ``out.partial``, fsync, then rename over ``out``: a
    failure leaves ``out`` as it was and no partial file. Serialising first keeps write
    errors OSErrors (torch's zip writer reports a full disk as a RuntimeError)."""
    partial = out.with_name(out.name + ".partial")
    try:
        buffer = io.BytesIO()
        serialise(buffer)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, out)
    except OSError as error:
        _remove(partial)
        reason = error.strerror or str(error) or type(error).__name__
        raise ExportError(f"could not write {out}: {reason}; check that its folder is "
                          "writable and the disk has space.") from error
    except BaseException:
        _remove(partial)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
