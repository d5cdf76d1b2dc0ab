"""The config's sections as typed dataclasses, each key with the paper's default and the
comment above it (the docs' configuration reference is generated from them)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from mixmask.config.scenarios import ScenarioConfig
from mixmask.config.transfer import TransferConfig
from mixmask.data.views import AUGMENTATION_PRESETS
from mixmask.errors import ConfigError, did_you_mean
from mixmask.methods.registry import method_class, method_names


@dataclass
class DataConfig:
    # cifar10 / cifar100 / stl10 (torchvision; STL-10 pretrains on unlabeled + train),
    # tinyimagenet (the official folder layout), imagefolder (ImageNet and any class-folder
    # tree or tarball), synthetic (smoke tests).
    dataset: Literal["cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder",
                     "synthetic"] = "cifar10"
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
    # The views' preset (the method says how many views), one of mixmask.data.views's
    # presets, which says what each is and whose paper it follows: cifar / mocov2 (MoCo v2
    # aug+ without / with blur), byol / byol_cifar, conservative (PixMIM), mae, a2mim_vit /
    # a2mim_resnet, siameseim / siameseim_cifar.
    augmentation: Literal[AUGMENTATION_PRESETS] = "cifar"
    # Views per image (0 = the method's own count); a method with a fixed count (every
    # Siamese base: 2; MAE / A2MIM: 1) refuses another.
    num_views: int = 0
    # cpu: PIL decode + torchvision augmentation in DataLoader workers (any dataset).
    # device: every view augmented on the training device in one batched call. In-memory
    # datasets (CIFAR, ImageFolder images up to 96 px) are held there as uint8; larger
    # ImageFolder files are decoded and cropped by DataLoader workers (num_workers).
    pipeline: Literal["cpu", "device"] = "cpu"
    num_workers: int = 2
    # Unreadable image files are skipped with a warning and counted in summary.json; a
    # split with more than this fraction of them stops with their list.
    max_bad_fraction: float = 0.01


@dataclass
class ModelConfig:
    # A name of the backbone registry (mixmask.models.backbones): resnet18, resnet34, resnet50,
    # vit_tiny, vit_small, vit_base (mixmask.models.vit; needs timm).
    backbone: str = "resnet18"
    # ResNets: cifar: 3x3 stride-1 stem, no max-pool (for 32-96 px); imagenet: torchvision's 7x7/2.
    stem: Literal["cifar", "imagenet"] = "cifar"
    # Multiplies every stage's channel count (1.0 = the standard ResNet): CPU-sized runs.
    width: float = 1.0
    # ViTs (vit_tiny / vit_small / vit_base; ResNets ignore the next three keys): the patch
    # side in pixels; it must divide data.image_size. 0 = by image size: 4 below 64 px, 8
    # below 224 px, 16 from 224 px (4 at 32 px and 8 at 64 px give an 8x8 grid as the
    # small-scale MAE / A2MIM setups of the notes; 16 at 224 px is ViT-B/16).
    patch_size: int = 0
    # The pooled feature: token = the cls token after the final LayerNorm (MAE pretraining,
    # linear probe); avg = the mean of the patch tokens, then a LayerNorm (timm's fc_norm,
    # MAE's fine-tuning with global_pool), in which case the tokens are not normalised.
    global_pool: Literal["token", "avg"] = "token"
    # Stochastic depth, rising linearly over the blocks to this rate (timm); in [0, 1).
    drop_path_rate: float = 0.0


class MethodConfig:
    """The ``method`` section: ``name``, the masking axis of the Siamese methods
    (``masking``, ``online_forward``, ``mask``, ``erase``, ``unmix``: their class's
    ``axis_config_class``), and one sub-section per registered method, ``method.<name>.*``
    (that method's ``config_class``).

    Every sub-section given is parsed and validated, so a typo under another method's name
    is still an error, and switching ``method.name`` keeps each method's own keys and
    defaults; the resolved config holds the active method's section only. Attributes
    resolve to the axis's fields (``config.method.mask``) and to the sections
    (``config.method.mocov2``: the parsed one, or that method's defaults).
    """

    def __init__(self, name: str = "mocov2", axis: Any = None,
                 sections: dict[str, Any] | None = None):

        method = method_class(name)
        self.name = name
        axis_class = getattr(method, "axis_config_class", None)
        self.axis = axis if axis is not None or axis_class is None else axis_class()
        self.sections = dict(sections or {})
        self.sections.setdefault(name, method.config_class())
        # Axis keys of the config file dropped by a command-line method switch (load_config).
        self.ignored_keys: list[str] = []

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails: the axis's fields, then the sections.
        if key.startswith("__") or key in ("name", "axis", "sections", "ignored_keys"):
            raise AttributeError(key)
        axis = self.__dict__.get("axis")
        if axis is not None and key in {f.name for f in dataclasses.fields(axis)}:
            return getattr(axis, key)
        sections = self.__dict__.setdefault("sections", {})
        if key not in sections:

            if key not in method_names():
                raise AttributeError(f"method config has no {key!r}")

            sections[key] = method_class(key).config_class()
        return sections[key]

    def __eq__(self, other: object) -> bool:
        # What a run uses (and its resolved config holds): name, axis, the active section.
        if not isinstance(other, MethodConfig):
            return NotImplemented
        return (self.name, self.axis, self.params) == (other.name, other.axis, other.params)

    def __repr__(self) -> str:
        return f"MethodConfig(name={self.name!r}, axis={self.axis!r}, params={self.params!r})"

    @property
    def params(self) -> Any:
        """The active method's own section (``method.<name>.*``)."""
        return self.sections[self.name]

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = {"name": self.name}
        if self.axis is not None:
            plain.update(_to_plain(dataclasses.asdict(self.axis)))
        plain[self.name] = _to_plain(dataclasses.asdict(self.params))
        return plain

    @classmethod
    def from_raw(cls, raw: Any) -> MethodConfig:

        if not isinstance(raw, dict):
            raise ConfigError(f"'method' must be a section (a mapping), got {raw!r}.")
        name = raw.get("name", "mocov2")
        if not isinstance(name, str):
            raise ConfigError(f"'method.name' must be a string, got {name!r}.")
        method = method_class(name)
        names = method_names()
        axis_classes = {getattr(method_class(other), "axis_config_class", None)
                        for other in names} - {None}
        axis_keys = {f.name for axis_class in axis_classes
                     for f in dataclasses.fields(axis_class)}
        known = ["name", *sorted(axis_keys), *names]
        for key in raw:
            if key not in known:
                hint = did_you_mean(key, known, "method.", cutoff=0.5)
                raise ConfigError(f"unknown config key 'method.{key}'.{hint} Valid keys here: "
                                  f"{', '.join(known)}.")
        axis_raw = {key: value for key, value in raw.items() if key in axis_keys}
        axis_class = getattr(method, "axis_config_class", None)
        axis = None
        if axis_class is None:
            # masking: none says "no masking", which holds for every method.
            offending = [key for key, value in axis_raw.items()
                         if not (key == "masking" and value == "none")]
            if offending:
                owners = ", ".join(other for other in names
                                   if getattr(method_class(other), "axis_config_class", None))
                raise ConfigError(
                    f"'method.{offending[0]}' belongs to the masking axis of the Siamese "
                    f"methods ({owners}); method '{name}' has no masking axis, so remove "
                    f"method.{offending[0]} from the config.")
        else:
            axis = build_section(axis_class, axis_raw, prefix="method.")
        sections = {other: build_section(method_class(other).config_class, raw[other],
                                  prefix=f"method.{other}.")
                    for other in names if other in raw}
        return cls(name, axis, sections)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 512
    max_steps: int = 0  # 0 = no cap
    device: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = 1  # processes (GPUs) per node under DDP
    # Nodes (machines) under multi-node DDP, each running `devices` processes; launched by
    # torchrun or SLURM (Lightning Fabric's cluster environments; configs/cluster/).
    num_nodes: int = 1
    # Convert BatchNorm to SyncBatchNorm under DDP: statistics over the global batch.
    sync_batchnorm: bool = False
    # auto: bf16 mixed precision where the device computes bf16 natively (a GPU that
    # supports it; a CPU with AVX-512 BF16 or AMX), fp32 elsewhere; resolved once at the
    # start of a command and recorded (mixmask.train.fabric.resolve_precision).
    precision: Literal["auto", "32", "bf16", "16"] = "auto"
    # NHWC activations: faster convolutions on tensor-core GPUs (same math).
    channels_last: bool = False
    # torch.compile the method's networks (backbone, heads, their EMA copies), in place, so
    # checkpoints keep their keys. The first steps are slow while it compiles.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: str = "inductor"  # any torch._dynamo backend, e.g. aot_eager to debug
    # One fused kernel for the SGD / AdamW update of all parameters (fused=True); false:
    # the multi-tensor (foreach) update. LARS always runs its multi-tensor update.
    fused_optimizer: bool = True
    # On the CPU (Linux, glibc): keep freed memory in the process for the next step instead of
    # returning it to the OS (see mixmask.train.runtime: no page faults per step instead of ~80k).
    keep_cpu_memory: bool = True
    seed: int = 0
    # sgd: every parameter decayed (MoCo, MixMask); lars: SGD with layer-wise trust ratios
    # (BYOL, Barlow Twins, VICReg recipes), biases and norm parameters excluded from
    # adaptation and weight decay; adamw (MAE, A2MIM, SiameseIM), biases, norms and tokens
    # not decayed. The method gives the parameter groups (mixmask.ops.optim).
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = 0.06
    momentum: float = 0.9  # sgd, lars
    betas: tuple[float, float] = (0.9, 0.999)  # adamw (MAE: 0.9, 0.95)
    weight_decay: float = 5e-4
    # A cosine from train.weight_decay to this over training, per step, on every decayed
    # group (DINO's and iBOT's weight-decay schedule: 0.04 -> 0.4); -1 = constant.
    weight_decay_end: float = -1.0
    lars_eta: float = 0.02
    # Clip the LARS trust ratio so the adapted lr never exceeds train.lr (solo-learn clip_lr).
    lars_clip_lr: bool = True
    # Scale lr linearly with batch size: lr * batch_size / 256.
    scale_lr_by_batch: bool = False
    warmup_epochs: float = 0.0
    # After the warm-up: cosine to train.min_lr, constant, or step (x train.lr_gamma at each
    # epoch of train.lr_milestones: A2MIM's ViT-B recipe, x0.1 at epoch 700 of 800).
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    min_lr: float = 0.0  # cosine's floor (A2MIM ResNet-50: 1e-5)
    lr_milestones: tuple[float, ...] = ()  # epochs
    lr_gamma: float = 0.1
    # Clip the gradients' global L2 norm to this before each update (0 = off; A2MIM ViT
    # 5.0, SiameseIM 1.0); the norm before clipping is logged as grad_norm.
    grad_clip: float = 0.0
    checkpoint_every: int = 10  # epochs; the last epoch always saves
    # Also save last.ckpt every N steps (0 = off), for long epochs.
    checkpoint_every_steps: int = 0
    log_every: int = 10  # steps
    # A non-finite loss or gradient: stop (the run ends; no checkpoint is ever written from
    # a non-finite state) or skip (that step's update is dropped and counted, at the cost
    # of one host read per step). Non-finite weights or buffers always stop the run.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress_bar: bool = True
    # RUN/plots/*.png that `mixmask pretrain` draws at the end (as `mixmask plot RUN`;
    # pretrain() from Python draws none): all (the curves of
    # metrics.csv, plus a t-SNE of test features and a retrieval grid when the dataset has
    # labels), curves (only the curves; no second pass over the data), none.
    plots: Literal["all", "curves", "none"] = "all"
    # Loggers beside metrics.csv: tensorboard (RUN/tensorboard/), or wandb (TensorBoard and
    # Weights & Biases; pip install 'mixmask[wandb]'), offline unless wandb_mode=online.
    logger: Literal["tensorboard", "wandb"] = "tensorboard"
    wandb_project: str = "mixmask"
    wandb_mode: Literal["offline", "online"] = "offline"
    # torch.profiler over this many steps (0: off) from step profile_start_step (past cuDNN
    # autotuning and allocator warm-up): out_dir/profile/ gets trace.json (Perfetto) and
    # summary.json with the share of the window the device was busy (mixmask.train.profiling).
    profile_steps: int = 0
    profile_start_step: int = 10

    @property
    def processes(self) -> int:
        """Training processes in all: ``devices`` on each of ``num_nodes`` nodes."""
        return self.devices * self.num_nodes


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
    """Evaluation at the end of pretraining and the `mixmask knn|linear|finetune` protocols."""

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
    # `mixmask linear --protocol moco` (MoCo's main_lincls.py: raw features, lr 30, wd 0).
    linear_moco_lr: float = 30.0
    linear_weight_decay: float = 0.0
    # `--protocol moco` with a BatchNorm (no affine) before the linear layer: MAE's
    # main_linprobe.py head, SiameseIM's linear probe (ViT runs).
    linear_batchnorm: bool = False
    # `mixmask knn` (InstDisc weighted kNN; the pretraining monitor has its own monitor.knn_*).
    knn_k: int = 200
    knn_temperature: float = 0.1
    # `mixmask finetune`: Barlow Twins' semi-supervised recipe (evaluate.py and its README:
    # --weights finetune --epochs 20 --lr-backbone 0.002 --lr-classifier 0.5
    # --weight-decay 0; SGD momentum 0.9, cosine over epochs, batch 256), the protocol the
    # MixMask paper's semi-supervised tables most likely follow (its code is unreleased).
    finetune_epochs: int = 20
    finetune_batch_size: int = 256
    finetune_lr_backbone: float = 0.002
    finetune_lr_head: float = 0.5
    finetune_weight_decay: float = 0.0
    # The finetune recipe: "sgd" is the one above; "mae" is MAE's main_finetune.py (He et
    # al., arXiv 2111.06377, appendix A.1), the ViT protocol of MAE, PixMIM, A2MIM and
    # SiameseIM: AdamW (0.9, 0.999), one lr = finetune_blr x batch / 256 (finetune_lr_* are
    # not used) scaled per layer by finetune_layer_decay, a per-step linear warm-up of
    # finetune_warmup_epochs then a half-cosine to finetune_min_lr, no weight decay on
    # biases, norms and tokens, the head ~ trunc_normal(std 2e-5). configs/eval/
    # finetune_mae.yaml holds MAE's ViT-B command (FINETUNE.md) with its defaults.
    finetune_recipe: str = "sgd"
    finetune_blr: float = 5e-4
    finetune_min_lr: float = 1e-6
    finetune_warmup_epochs: int = 5
    # Options of either recipe (MAE's values in brackets; the defaults leave them off):
    # layer-wise lr decay, 1 = off (0.65 for ViT-B; ViTs only); stochastic depth of the ViT's
    # blocks, linear in depth [0.1]; label smoothing [0.1]; Mixup / CutMix alphas of timm's
    # Mixup, one of the two per batch, 0 = off [0.8 / 1.0]; a RandAugment policy string of
    # timm's [rand-m9-mstd0.5-inc1], "" = off; RandomErasing probability [0.25]; the pooling
    # of the finetuned ViT, "" = the run's model.global_pool ["avg": MAE drops the
    # pretrained final norm for a fresh fc_norm after average pooling].
    finetune_layer_decay: float = 1.0
    finetune_drop_path: float = 0.0
    finetune_label_smoothing: float = 0.0
    finetune_mixup: float = 0.0
    finetune_cutmix: float = 0.0
    finetune_randaugment: str = ""
    finetune_random_erasing: float = 0.0
    finetune_global_pool: str = ""
    # Label subsets (1%, 10%): class-balanced, drawn with this seed from the train split.
    label_seed: int = 0
    # ImageNet: SimCLR's 1percent.txt / 10percent.txt (one file name per line), used
    # instead of the drawn subset when given.
    label_split_file: str = ""


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    scenarios: ScenarioConfig = field(default_factory=ScenarioConfig)
    out_dir: str = "runs/run"
    # none | auto (continue from out_dir/checkpoints/last.ckpt if it exists) | a path
    resume: str = "none"

    def to_dict(self) -> dict[str, Any]:
        plain = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, MethodConfig):
                plain[item.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                plain[item.name] = _to_plain(dataclasses.asdict(value))
            else:
                plain[item.name] = value
        return plain


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------- building


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a section (a mapping), got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = did_you_mean(key, fields, prefix, cutoff=0.5)
            valid = ", ".join(fields)
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {valid}."
            )
    values = {
        name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw
    }
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    if kind is MethodConfig:
        return MethodConfig.from_raw(value)
    if dataclasses.is_dataclass(kind):
        return build_section(kind, value, key + ".")
    origin = get_origin(kind)
    if origin is Literal:
        choices = get_args(kind)
        if value not in choices and str(value) in choices:
            value = str(value)  # precision: 16 parses as an int
        if value not in choices:
            names = ", ".join(repr(choice) for choice in choices)
            hint = did_you_mean(value, choices)
            raise ConfigError(f"'{key}' must be one of {names}; got {value!r}.{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        item_kinds = get_args(kind)
        if len(item_kinds) == 2 and item_kinds[1] is Ellipsis:
            return tuple(_coerce(item_kinds[0], item, key) for item in value)
        if len(value) != len(item_kinds):
            raise ConfigError(f"'{key}' must be a list of {len(item_kinds)} values, got {value!r}.")
        return tuple(_coerce(item_kind, item, key)
                     for item_kind, item in zip(item_kinds, value, strict=True))
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
