"""Optimizers for pretraining and finetuning: SGD (MoCo, MixMask), LARS (BYOL, Barlow
Twins, VICReg) and AdamW (MAE, A2MIM, ViT finetuning), all built from parameter groups.

Each method says how its parameters are grouped; :func:`build_optimizer` only turns the
groups into an optimizer. A parameter group is a dict::

    {"params": [Tensor, ...],          # in the model's named_parameters() order
     "param_names": [str, ...],        # the same length; torch's own key (see below)
     "weight_decay": float,            # optional: overrides build_optimizer's default
     "lr_scale": float,                # default 1.0: the engine sets lr = base_lr * lr_scale
     "lars_exclude": bool}             # optional, LARS only: no adaptation, no decay

:func:`parameter_groups` makes them from named parameters. Usage::

    # SGD (MoCo v2, MixMask): one group, one weight decay.
    groups = parameter_groups(method.named_parameters())
    optimizer = build_optimizer("sgd", groups, lr=0.06, momentum=0.9, weight_decay=5e-4)

    # LARS (You et al. 2017, arXiv 1708.03888; as in BYOL / Barlow Twins): biases and
    # normalisation parameters neither adapted nor decayed.
    groups = param_groups_for_lars(method.named_parameters())
    # == parameter_groups(..., exclude_from_decay=no_decay_bias_and_norm, lars=True)
    optimizer = build_optimizer("lars", groups, lr=0.2, weight_decay=1.5e-6)

    # AdamW (Loshchilov & Hutter, arXiv 1711.05101; MAE, arXiv 2111.06377): no weight
    # decay on biases, norms and tokens.
    groups = parameter_groups(method.named_parameters(),
                              exclude_from_decay=no_decay_bias_norm_and_tokens)
    optimizer = build_optimizer("adamw", groups, lr=1.5e-4, betas=(0.9, 0.95),
                                weight_decay=0.05)

    # Layer-wise lr decay for finetuning a 12-block ViT (BEiT, arXiv 2106.08254; MAE
    # finetuning): block i at 0.75 ** (12 - i) of the lr, embeddings 0.75 ** 13.
    groups = parameter_groups(model.named_parameters(),
                              exclude_from_decay=no_decay_bias_norm_and_tokens,
                              lr_scale=layer_decay_lr_scale(12, 0.75))
    optimizer = build_optimizer("adamw", groups, lr=5e-4, weight_decay=0.05)

    # The engine, every step (base_lr from the schedule):
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_scale"]

``"param_names"``: recent torch (checked on 2.14) accepts ``(name, tensor)`` pairs as
``params`` and stores the names under this key of each group; a group given with tensors
and its own ``"param_names"`` keeps them untouched. ``state_dict()`` saves the names with
the group and ``load_state_dict()`` restores them (they do not affect matching, which is by
position). torch requires all groups of an optimizer to have names or none. The meaning is
the same as ours, so we use torch's key rather than a private one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LARS",
    "NO_DECAY_TOKEN_NAMES",
    "VIT_EMBEDDING_NAMES",
    "build_optimizer",
    "layer_decay_lr_scale",
    "no_decay_bias_and_norm",
    "no_decay_bias_norm_and_tokens",
    "param_groups_for_lars",
    "parameter_groups",
    "vit_layer_id",
]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv 1708.03888), in the form of
    BYOL, Barlow Twins and solo-learn: for each parameter p with gradient g::

        g     = g + weight_decay * p                                 (not for excluded)
        trust = eta * ||p|| / ||g||  if ||p|| > 0 and ||g|| > 0, else 1   (not for excluded)
        trust = min(trust / lr, 1)                                   (only with clip_lr)
        buf   = momentum * buf + trust * g
        p     = p - lr * buf

    Parameters of groups flagged ``{"lars_exclude": True}`` (biases and normalisation
    parameters, see :func:`param_groups_for_lars`) get neither weight decay nor
    adaptation: plain SGD with momentum, as in the papers. The flag is read from the group,
    never guessed from shapes here. ``exclude_bias_and_norm=False`` ignores the flag
    (every parameter adapted and decayed: an ablation).

    No value is read back to the host: the trust ratio is computed on the device.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        clip_lr: bool = False,
        exclude_bias_and_norm: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"LARS learning rate must be non-negative, got {lr}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}.")
        if weight_decay < 0:
            raise ValueError(f"LARS weight decay must be non-negative, got {weight_decay}.")
        if eta <= 0:
            raise ValueError(f"LARS eta (trust coefficient) must be positive, got {eta}.")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        clip_lr=clip_lr, exclude_bias_and_norm=exclude_bias_and_norm,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Multi-tensor (foreach) ops over a group: a few kernels per group, not several
        # per parameter, which matters on a GPU where a ResNet has ~60 parameter tensors.
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if not params:
                continue
            updates = [param.grad for param in params]
            if not (group["lars_exclude"] and group["exclude_bias_and_norm"]):
                updates = self._adapt(params, updates, group)
            buffers = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapt(params: list[Tensor], grads: list[Tensor], group: dict) -> list[Tensor]:
        """Weight decay, then the layer-wise trust ratios (computed on the device)."""
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        param_norms = torch.stack(torch._foreach_norm(params))
        grad_norms = torch.stack(torch._foreach_norm(grads))
        both_positive = (param_norms > 0) & (grad_norms > 0)
        # The inner where keeps 0/0 out of the graph of values (no NaN even where unused).
        trust = torch.where(
            both_positive,
            group["eta"] * param_norms / torch.where(both_positive, grad_norms, 1.0),
            1.0,
        )
        if group["clip_lr"]:
            # solo-learn's clipping: the effective step lr * trust never exceeds lr * 1.
            trust = torch.clamp(trust / group["lr"], max=1.0)
        return torch._foreach_mul(grads, list(trust.unbind()))


# --------------------------------------------------------------------------------------
# Parameter groups


def no_decay_bias_and_norm(name: str, param: Tensor) -> bool:
    """Biases and normalisation weights (``ndim <= 1``): no weight decay (and, for LARS,
    no adaptation; BYOL sec. 3.3 / Barlow Twins). Also the rule of timm's
    ``add_weight_decay`` that MAE pretraining uses (1-D parameters and ``.bias``)."""
    return param.ndim <= 1


# timm's VisionTransformer.no_weight_decay() is {"pos_embed", "cls_token", "dist_token"};
# MAE finetuning passes it to its layer-decay groups. mask_token (BEiT, SimMIM, A2MIM) and
# register tokens (timm's reg_token, DINOv2's register_tokens) are tokens of the same kind.
NO_DECAY_TOKEN_NAMES = frozenset({
    "cls_token", "dist_token", "mask_token", "pos_embed", "decoder_pos_embed",
    "reg_token", "register_tokens",
})


def no_decay_bias_norm_and_tokens(name: str, param: Tensor) -> bool:
    """:func:`no_decay_bias_and_norm`, plus the learnt tokens and position embeddings of a
    ViT: parameters whose last name component is in :data:`NO_DECAY_TOKEN_NAMES`
    (``cls_token``, ``pos_embed``, ``mask_token``, ... with any prefix such as
    ``backbone.``). The no-weight-decay set of timm's ViTs and of MAE finetuning (MAE,
    arXiv 2111.06377). MAE's pretraining script excludes only the ``ndim <= 1`` ones."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_TOKEN_NAMES


def parameter_groups(
    named_parameters: Iterable[tuple[str, Tensor]],
    *,
    exclude_from_decay: Callable[[str, Tensor], bool] | None = None,
    lr_scale: Callable[[str, Tensor], float] | None = None,
    lars: bool = False,
) -> list[dict]:
    """Parameter groups of the trainable (``requires_grad``) parameters, one group per
    (excluded from weight decay, lr scale) pair.

    Groups come in the order of their first parameter, parameters within a group in the
    order given. Each group has ``params``, ``param_names`` and ``lr_scale`` (1.0 without
    ``lr_scale``); groups excluded by ``exclude_from_decay`` also ``weight_decay: 0.0``,
    and ``lars_exclude: True`` when ``lars``. Others take the optimizer's weight decay.
    With neither function: one group holding every trainable parameter.
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        excluded = bool(exclude_from_decay(name, param)) if exclude_from_decay else False
        scale = float(lr_scale(name, param)) if lr_scale else 1.0
        if not scale >= 0:
            raise ValueError(f"lr_scale must be non-negative, got {scale} for {name!r}.")
        group = groups.get((excluded, scale))
        if group is None:
            group = {"params": [], "param_names": [], "lr_scale": scale}
            if excluded:
                group["weight_decay"] = 0.0
                if lars:
                    group["lars_exclude"] = True
            groups[(excluded, scale)] = group
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def param_groups_for_lars(named_parameters: Iterable[tuple[str, Tensor]]) -> list[dict]:
    """Split trainable parameters for :class:`LARS`: weights in a first group, biases and
    normalisation parameters (ndim <= 1) in a second with ``lars_exclude: True`` and
    ``weight_decay: 0`` (BYOL sec. 3.3 / Barlow Twins' reference exclude them from both).
    Parameters without ``requires_grad`` are left out; empty groups are dropped.

    :func:`parameter_groups` with :func:`no_decay_bias_and_norm` and ``lars=True``, except
    that the weights' group always comes first (as it always did, whatever the first
    parameter), so that checkpoints keep their group order."""
    groups = parameter_groups(named_parameters, exclude_from_decay=no_decay_bias_and_norm,
                              lars=True)
    return sorted(groups, key=lambda group: group.get("lars_exclude", False))  # stable


def pretraining_groups(optimizer: str, named_parameters: Iterable[tuple[str, Tensor]]
                       ) -> list[dict]:
    """The pretraining rule for ``train.optimizer``: sgd decays every parameter (MoCo's and
    MixMask's reference code); lars excludes biases and norms from adaptation and decay
    (BYOL sec. 3.3); adamw excludes biases, norms and tokens from decay (MAE, arXiv
    2111.06377, app. A.1)."""
    if optimizer == "sgd":
        return parameter_groups(named_parameters)
    if optimizer == "lars":
        return param_groups_for_lars(named_parameters)
    return parameter_groups(named_parameters, exclude_from_decay=no_decay_bias_norm_and_tokens)


# --------------------------------------------------------------------------------------
# Layer-wise lr decay (BEiT arXiv 2106.08254; MAE's finetuning)

# Name components of the parameters before the first block: layer 0.
VIT_EMBEDDING_NAMES = NO_DECAY_TOKEN_NAMES | {"patch_embed"}


def vit_layer_id(name: str, num_layers: int, *, blocks: str = "blocks") -> int:
    """The layer of a ViT parameter for layer-wise lr decay, as in BEiT / MAE: 0 for the
    embeddings (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``mask_token``, register
    tokens), ``i + 1`` for ``blocks.i.*``, ``num_layers + 1`` for everything else (final
    norm, head).

    Names are matched by component, so any prefix works (``backbone.blocks.3.mlp.fc1.weight``
    is layer 4); ``blocks`` names the component holding the blocks."""
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part == blocks and parts[index + 1].isdigit():
            block = int(parts[index + 1])
            if block >= num_layers:
                raise ValueError(f"{name!r} is in block {block}, but the model was said to "
                                 f"have {num_layers} blocks.")
            return block + 1
    if any(part in VIT_EMBEDDING_NAMES for part in parts):
        return 0
    return num_layers + 1


def layer_decay_lr_scale(
    num_layers: int,
    decay: float,
    layer_id: Callable[[str, int], int] = vit_layer_id,
) -> Callable[[str, Tensor], float]:
    """The ``lr_scale`` function of layer-wise lr decay: ``decay ** (num_layers + 1 -
    layer_id(name, num_layers))``, i.e. 1 for the head and final norm, ``decay`` for the
    last block, ..., ``decay ** (num_layers + 1)`` for the embeddings (BEiT; MAE finetunes
    ViT-B with 0.75). For :func:`parameter_groups`."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be non-negative, got {num_layers}.")
    if not 0 < decay <= 1:
        raise ValueError(f"Layer decay must be in (0, 1], got {decay}.")

    def scale(name: str, param: Tensor) -> float:
        return decay ** (num_layers + 1 - layer_id(name, num_layers))

    return scale


# --------------------------------------------------------------------------------------
# The optimizer

OPTIMIZERS = ("sgd", "lars", "adamw")


def _fill_lr_scale_from_current_groups(optimizer: torch.optim.Optimizer,
                                       state_dict: dict) -> dict:
    """load_state_dict pre-hook: a checkpoint saved before groups carried ``lr_scale``
    keeps the scales of the groups built now (torch would drop the key)."""
    saved = state_dict["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        return state_dict  # torch raises its own error
    groups = [group if "lr_scale" in group else {**group, "lr_scale": current["lr_scale"]}
              for group, current in zip(saved, optimizer.param_groups, strict=True)]
    return {**state_dict, "param_groups": groups}


def build_optimizer(
    name: Literal["sgd", "lars", "adamw"],
    groups: list[dict],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eta: float = 0.02,
    clip_lr: bool = False,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer over parameter groups (see the module docstring and
    :func:`parameter_groups`).

    ``"sgd"``: torch.optim.SGD with ``momentum`` (MoCo v2, MixMask); ``"lars"``:
    :class:`LARS` with ``momentum``, ``eta`` and ``clip_lr`` (BYOL, Barlow Twins, VICReg;
    give it :func:`param_groups_for_lars`); ``"adamw"``: torch.optim.AdamW with ``betas``
    (MAE, finetuning). ``weight_decay`` is the default of groups without their own.
    ``fused=True`` makes SGD and AdamW one fused kernel for all parameters (same update,
    up to float rounding), else they use foreach kernels; LARS is always foreach.

    The groups are copied (the caller's dicts are not changed); each gets ``lr_scale``
    (1.0 if absent) and ``lr = lr * lr_scale``, which the engine overwrites every step.
    A single group of every parameter gives exactly the updates of ``torch.optim.SGD``
    over the parameter list, and :func:`param_groups_for_lars` exactly those of LARS
    before groups were introduced.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}: use one of "
                         f"{', '.join(repr(known) for known in OPTIMIZERS)}.")
    groups = list(groups)
    if not groups:
        raise ValueError("build_optimizer got no parameter groups.")
    built = []
    for group in groups:
        if not isinstance(group, dict):
            raise TypeError("build_optimizer takes parameter groups (dicts), got "
                            f"{type(group).__name__}; make them with parameter_groups("
                            "model.named_parameters(), ...).")
        if "lr" in group:
            raise ValueError("A parameter group sets 'lr'; set 'lr_scale' instead (the "
                             "group's lr is lr * lr_scale).")
        group = {**group, "params": list(group["params"])}
        if "param_names" in group:
            group["param_names"] = list(group["param_names"])
            if len(group["param_names"]) != len(group["params"]):
                raise ValueError("A parameter group has "
                                 f"{len(group['param_names'])} param_names for "
                                 f"{len(group['params'])} params.")
        group["lr_scale"] = float(group.get("lr_scale", 1.0))
        group["lr"] = lr * group["lr_scale"]
        built.append(group)

    implementation = {"fused": True} if fused else {"foreach": True}
    optimizer: torch.optim.Optimizer
    if name == "sgd":
        optimizer = torch.optim.SGD(built, lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, **implementation)
    elif name == "lars":
        optimizer = LARS(built, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         eta=eta, clip_lr=clip_lr)
    else:
        optimizer = torch.optim.AdamW(built, lr=lr, betas=betas, weight_decay=weight_decay,
                                      **implementation)
    optimizer.register_load_state_dict_pre_hook(_fill_lr_scale_from_current_groups)
    return optimizer
