"""Typed, validated run configuration.

YAML files select and override; every key lives in a dataclass below with the paper's
default. Command-line overrides are ``section.key=value`` (values parsed as YAML). An
unknown or mistyped key is a :class:`ConfigError` that names it and the closest valid key.

A YAML file may start with ``base: other.yaml`` or ``base: [a.yaml, b.yaml]`` (relative
to the file; later ones override earlier ones) to inherit and override other configs, so a
recipe variant is a one-screen fragment, and a base x masking config is one line that
composes a recipe with a masking fragment (configs/make_matrix.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from mixmask.errors import ConfigError

MethodName = Literal["mocov2", "byol", "simsiam", "barlow_twins", "vicreg"]
MaskingName = Literal["none", "erase", "mixmask", "unmix", "both"]
# Bases whose loss is a statistic of the whole batch (one value, not one per sample).
BATCH_LEVEL_METHODS = ("barlow_twins", "vicreg")


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "imagefolder", "synthetic"] = "cifar10"
    root: str = "data"
    download: bool = False
    # Use only the first N training images (0 = all). ImageFolder data is ordered
    # round-robin over classes, so a prefix is class-balanced.
    subset: int = 0
    # Evaluation sets: images of the train split in the kNN bank / probe, and test images
    # (0 = all).
    eval_train_subset: int = 0
    eval_test_subset: int = 0
    image_size: int = 32
    # mixmask.data.transforms: cifar / mocov2 (MoCo v2 aug+ without / with blur), byol /
    # byol_cifar (BYOL's asymmetric views, Grill et al. 2020, Table 6; without blur).
    augmentation: Literal["cifar", "mocov2", "byol", "byol_cifar"] = "cifar"
    # cpu: PIL decode + torchvision augmentation in DataLoader workers (any dataset).
    # device: both views augmented on the training device in one batched call. In-memory
    # datasets (CIFAR, ImageFolder images up to 96 px) are held there as uint8; larger
    # ImageFolder files are decoded and cropped by DataLoader workers (num_workers).
    pipeline: Literal["cpu", "device"] = "cpu"
    num_workers: int = 2


@dataclass
class ModelConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    # cifar: 3x3 stride-1 stem, no max-pool (for 32-96 px); imagenet: torchvision's 7x7/2.
    stem: Literal["cifar", "imagenet"] = "cifar"
    # Multiplies every stage's channel count (1.0 = the standard ResNet): CPU-sized runs.
    width: float = 1.0


@dataclass
class MaskConfig:
    """Grid masks (design.md sec. 2): a g x g grid, block (BEiT) or discrete cells. MixMask
    fills the masked cells from the partner image; ``erase`` uses the same grid."""

    # 8 cells a side at every image size: the paper's 8x8 grid at 224 px; at 32 px the
    # same 64 cells keep the block-mask statistics and match the 8x8 token grid of a
    # patch-4 ViT. A 4x4 grid leaves too few distinct block masks.
    grid_size: int = 8
    mask_ratio: float = 0.5
    mode: Literal["block", "discrete"] = "block"
    # The reference draws one mask per step for the whole batch; per-sample is an ablation.
    per_sample: bool = False


@dataclass
class EraseConfig:
    """MSCN-style erasing (Jing et al., arXiv 2206.07700) of the online view's masked cells
    (grid size, ratio, mode and per-sample from ``method.mask``)."""

    # grid: the method.mask grid; focal: keep one random rectangle, erase the rest.
    shape: Literal["grid", "focal"] = "grid"
    # noise: N(0, noise_std^2) in normalised space; zero: black pixels; mean: dataset mean.
    fill: Literal["noise", "zero", "mean"] = "noise"
    noise_std: float = 1.0
    # Every colour channel gets its own mask.
    channel_wise: bool = False
    # Gaussian high-pass filter on the online view before erasing (0 = off).
    high_pass_sigma: float = 0.0


@dataclass
class UnMixConfig:
    """Un-Mix (Shen et al., arXiv 2003.05438): Mixup or CutMix with the reversed batch."""

    p_mixup: float = 0.5  # probability of Mixup (else CutMix) at each step
    alpha: float = 1.0  # lambda ~ Beta(alpha, alpha); Beta(1, 1) = U(0, 1) as in Un-Mix


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
    # Shuffle-BN for the key encoder across processes under DDP (no-op on one device, where
    # BN already normalises over the whole batch).
    shuffle_bn: bool = True


@dataclass
class BYOLConfig:
    """BYOL (Grill et al., arXiv 2006.07733); defaults: solo-learn's CIFAR recipe."""

    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    # Target EMA momentum: cosine from start to end over training (BYOL sec. 3.2).
    momentum_start: float = 0.99
    momentum_end: float = 1.0


@dataclass
class SimSiamConfig:
    """SimSiam (Chen & He, arXiv 2011.10566); defaults: its CIFAR setting (2-layer
    projector, 2048-d, bottleneck predictor 512)."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    pred_hidden_dim: int = 512


@dataclass
class BarlowTwinsConfig:
    """Barlow Twins (Zbontar et al., arXiv 2103.03230); defaults: solo-learn's CIFAR recipe."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    lambda_offdiag: float = 0.0051
    scale_loss: float = 0.1


@dataclass
class VICRegConfig:
    """VICReg (Bardes et al., arXiv 2105.04906); defaults: the paper's weights and
    solo-learn's CIFAR projector."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0


@dataclass
class MethodConfig:
    name: MethodName = "mocov2"
    masking: MaskingName = "none"
    # How the online network sees a step's batches (the clean view and its mixes):
    # separate: one forward each, so BN normalises each by its own statistics (the papers'
    # code); joint: one forward of their concatenation (fewer, larger kernels), BN
    # statistics then pooled over the clean and mixed images. Same loss otherwise.
    online_forward: Literal["separate", "joint"] = "separate"
    mask: MaskConfig = field(default_factory=MaskConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    unmix: UnMixConfig = field(default_factory=UnMixConfig)
    # Method-specific keys live under the method's name, so switching ``method.name`` on
    # the command line keeps each method's own defaults.
    mocov2: MoCoV2Config = field(default_factory=MoCoV2Config)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    barlow_twins: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    vicreg: VICRegConfig = field(default_factory=VICRegConfig)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 512
    max_steps: int = 0  # 0 = no cap
    device: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = 1  # processes (GPUs) under DDP
    precision: Literal["32", "bf16", "16"] = "32"
    # NHWC activations: faster convolutions on tensor-core GPUs (same math).
    channels_last: bool = False
    # torch.compile the method's networks (backbone, heads, their EMA copies), in place, so
    # checkpoints keep their keys. The first steps are slow while it compiles.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: str = "inductor"  # any torch._dynamo backend, e.g. aot_eager to debug
    # One fused kernel for the SGD update of all parameters (torch.optim.SGD(fused=True));
    # false: the multi-tensor (foreach) update. LARS always runs its multi-tensor update.
    fused_optimizer: bool = True
    # On the CPU (Linux, glibc): keep freed memory in the process for the next step instead of
    # returning it to the OS (see mixmask.runtime: no page faults per step instead of ~80k).
    keep_cpu_memory: bool = True
    seed: int = 0
    # lars: SGD with layer-wise trust ratios (BYOL, Barlow Twins, VICReg recipes); biases
    # and norm parameters are excluded from adaptation and weight decay.
    optimizer: Literal["sgd", "lars"] = "sgd"
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lars_eta: float = 0.02
    # Clip the LARS trust ratio so the adapted lr never exceeds train.lr (solo-learn clip_lr).
    lars_clip_lr: bool = True
    # Scale lr linearly with batch size: lr * batch_size / 256.
    scale_lr_by_batch: bool = False
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    checkpoint_every: int = 10  # epochs; the last epoch always saves
    log_every: int = 10  # steps
    progress_bar: bool = True
    # torch.profiler over this many steps (0: off) from step profile_start_step (past cuDNN
    # autotuning and allocator warm-up): out_dir/profile/ gets trace.json (Perfetto) and
    # summary.json with the share of the window the device was busy (mixmask.profiling).
    profile_steps: int = 0
    profile_start_step: int = 10


@dataclass
class MonitorConfig:
    """Online linear probe and kNN monitor, run during pretraining."""

    online_probe: bool = True
    probe_lr: float = 0.1
    knn: bool = True
    knn_every: int = 1  # epochs
    knn_k: int = 200
    knn_temperature: float = 0.1


@dataclass
class EvalConfig:
    """Evaluation at the end of pretraining (and defaults for `mixmask knn|linear`)."""

    knn: bool = True
    linear: bool = False
    # Also evaluate the randomly initialised backbone (same seed) for comparison.
    compare_random_init: bool = False
    linear_epochs: int = 100
    # On standardised features (see mixmask.eval.linear), not MoCo's raw-feature lr 30.
    linear_lr: float = 0.1
    linear_batch_size: int = 256
    # Step decays (x0.1) at these fractions of the epochs (MoCo: 60/80 of 100).
    linear_milestones: tuple[float, ...] = (0.6, 0.8)


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/run"
    # none | auto (continue from out_dir/checkpoints/last.ckpt if it exists) | a path
    resume: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}.")
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(item, str) for item in bases):
        raise ConfigError(f"config {path}: 'base' must be a file name or a list of them.")
    merged: dict[str, Any] = {}
    for base in bases:  # later files override earlier ones; this file overrides them all
        _deep_merge(merged, _read_yaml(path.parent / base, (*seen, path.resolve())))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value.")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{key}' is a value, not a section.")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a section (a mapping), got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            suggestion = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{suggestion[0]}'?" if suggestion else ""
            valid = ", ".join(fields)
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {valid}."
            )
    values = {
        name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw
    }
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key + ".")
    origin = get_origin(kind)
    if origin is Literal:
        choices = get_args(kind)
        if value not in choices and str(value) in choices:
            value = str(value)  # precision: 16 parses as an int
        if value not in choices:
            names = ", ".join(repr(choice) for choice in choices)
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"'{key}' must be one of {names}; got {value!r}.{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        item_kind = get_args(kind)[0]
        return tuple(_coerce(item_kind, item, key) for item in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}.")
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a string, got {value!r}.")
        return str(value)
    raise TypeError(f"unsupported config type {kind} for {key}")


def validate(config: Config) -> None:
    """Cross-field checks the types cannot express."""
    positive = {
        "data.image_size": config.data.image_size,
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "train.devices": config.train.devices,
        "model.width": config.model.width,
        "method.mask.grid_size": config.method.mask.grid_size,
        "monitor.knn_k": config.monitor.knn_k,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive, got {value}.")
    for key, value in {
        "data.subset": config.data.subset,
        "train.max_steps": config.train.max_steps,
        "data.num_workers": config.data.num_workers,
        "train.profile_steps": config.train.profile_steps,
        "train.profile_start_step": config.train.profile_start_step,
    }.items():
        if value < 0:
            raise ConfigError(f"'{key}' must be 0 or more, got {value}.")
    _validate_masking(config)
    if config.method.name == "mocov2" and (
            config.method.mocov2.queue_size < config.train.batch_size):
        raise ConfigError(
            f"'method.mocov2.queue_size' ({config.method.mocov2.queue_size}) must hold at least "
            f"one batch of keys (train.batch_size={config.train.batch_size})."
        )
    byol, moco = config.method.byol, config.method.mocov2
    for key, value in (("byol.momentum_start", byol.momentum_start),
                       ("byol.momentum_end", byol.momentum_end),
                       ("mocov2.momentum", moco.momentum),
                       ("mocov2.momentum_end", moco.momentum_end)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"'method.{key}' must lie in [0, 1], got {value}.")


def _validate_masking(config: Config) -> None:
    """Mask parameters that cannot work, said before any data is loaded."""
    method, mask = config.method, config.method.mask
    if not 0.0 < mask.mask_ratio < 1.0:
        raise ConfigError(f"'method.mask.mask_ratio' must lie in (0, 1), got {mask.mask_ratio}.")
    uses_grid = method.masking in ("mixmask", "both") or (
        method.masking == "erase" and method.erase.shape == "grid")
    image_size = config.data.image_size
    if uses_grid and (mask.grid_size < 2 or mask.grid_size > image_size
                      or image_size % mask.grid_size):
        raise ConfigError(
            f"'method.mask.grid_size' ({mask.grid_size}) must be at least 2 and divide "
            f"data.image_size ({image_size}) into whole cells, e.g. 4 or 8."
        )
    local_batch = config.train.batch_size // config.train.devices
    if method.masking in ("mixmask", "unmix", "both") and local_batch % 2:
        raise ConfigError(
            f"'{method.masking}' pairs each image with another of the batch (the reversed "
            f"batch): the per-device batch must be even, got {local_batch} "
            f"(train.batch_size={config.train.batch_size}, train.devices={config.train.devices})."
        )
    if (method.masking in ("mixmask", "both") and mask.per_sample
            and method.name in BATCH_LEVEL_METHODS):
        raise ConfigError(
            f"{method.name}'s loss is one value for the whole batch, so MixMask needs one mask "
            "(one lambda) per batch: set method.mask.per_sample=false."
        )
    unmix, erase = method.unmix, method.erase
    if not 0.0 <= unmix.p_mixup <= 1.0:
        raise ConfigError(f"'method.unmix.p_mixup' must lie in [0, 1], got {unmix.p_mixup}.")
    if unmix.alpha <= 0:
        raise ConfigError(f"'method.unmix.alpha' must be positive, got {unmix.alpha}.")
    for key, value in (("noise_std", erase.noise_std), ("high_pass_sigma", erase.high_pass_sigma)):
        if value < 0:
            raise ConfigError(f"'method.erase.{key}' must be 0 or more, got {value}.")


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
