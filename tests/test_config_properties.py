"""Property-based checks over the config space (hypothesis): every invalid value drawn is
rejected with a message naming its key; every valid combination drawn builds its method
and trains a step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.errors import ConfigError
from mixmask.methods import BUILTIN_METHODS, build_method
from mixmask.ops.optim import build_optimizer
from mixmask.train.step import training_step

NEGATIVE = st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)
NON_POSITIVE_INT = st.integers(max_value=0)
# (key, values that key must refuse)
INVALID = {
    "train.lr": st.one_of(NEGATIVE, st.just(0.0)),
    "train.weight_decay": NEGATIVE,
    "train.momentum": st.one_of(NEGATIVE, st.floats(min_value=1.0, max_value=1e6)),
    "train.epochs": NON_POSITIVE_INT,
    "train.batch_size": NON_POSITIVE_INT,
    "train.warmup_epochs": NEGATIVE,
    "train.log_every": NON_POSITIVE_INT,
    "train.checkpoint_every_steps": st.integers(max_value=-1),
    "train.lars_eta": st.one_of(NEGATIVE, st.just(0.0)),
    "data.image_size": NON_POSITIVE_INT,
    "data.subset": st.integers(max_value=-1),
    "model.width": st.one_of(NEGATIVE, st.just(0.0)),
    "monitor.knn_k": NON_POSITIVE_INT,
    "monitor.knn_temperature": st.one_of(NEGATIVE, st.just(0.0)),
    "eval.linear_lr": st.one_of(NEGATIVE, st.just(0.0)),
    "method.mask.mask_ratio": st.one_of(st.floats(max_value=0.0, allow_nan=False,
                                                  allow_infinity=False),
                                        st.floats(min_value=1.0, max_value=10.0)),
    "method.mocov2.momentum": st.one_of(NEGATIVE, st.floats(min_value=1.001, max_value=10.0)),
    "method.unmix.p_mixup": st.floats(min_value=1.001, max_value=10.0),
    "method.unmix.alpha": st.one_of(NEGATIVE, st.just(0.0)),
    "method.erase.noise_std": NEGATIVE,
}
WRONG_TYPE = {"train.epochs": "ten", "train.lr": "fast", "data.download": 3,
              "method.masking": "mixmsk", "train.optimizer": "adam", "model.stem": "vit"}


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(sorted(INVALID)), data=st.data())
def test_every_invalid_value_is_rejected_naming_its_key(key, data):
    value = data.draw(INVALID[key])
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{key}={value!r}"])
    assert key in str(error.value)


@pytest.mark.parametrize(("key", "value"), sorted(WRONG_TYPE.items()))
def test_values_of_the_wrong_type_are_rejected_naming_their_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


@st.composite
def valid_configs(draw):
    method = draw(st.sampled_from(BUILTIN_METHODS))
    masking = draw(st.sampled_from(["none", "erase", "mixmask", "unmix", "both"]))
    batch_level = method in ("barlow_twins", "vicreg")
    overrides = [
        f"method.name={method}", f"method.masking={masking}", "model.width=0.125",
        "data.image_size=16", "train.batch_size=8", "method.mocov2.queue_size=64",
        f"method.mask.grid_size={draw(st.sampled_from([2, 4, 8]))}",
        f"method.mask.mask_ratio={draw(st.floats(min_value=0.1, max_value=0.9))}",
        f"method.mask.mode={draw(st.sampled_from(['block', 'discrete']))}",
        f"method.mask.generator={draw(st.sampled_from(['beit', 'exact_count']))}",
        f"method.mask.per_sample={str(draw(st.booleans()) and not batch_level).lower()}",
        f"method.erase.shape={draw(st.sampled_from(['grid', 'focal']))}",
        f"method.unmix.p_mixup={draw(st.floats(min_value=0.0, max_value=1.0))}",
        f"train.optimizer={draw(st.sampled_from(['sgd', 'lars', 'adamw']))}",
        f"train.lr={draw(st.floats(min_value=1e-4, max_value=0.5))}",
        f"method.online_forward={draw(st.sampled_from(['separate', 'joint']))}",
    ]
    for base, dims in {"mocov2": ("proj_hidden_dim", "proj_output_dim"),
                       "byol": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
                       "simsiam": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
                       "barlow_twins": ("proj_hidden_dim", "proj_output_dim"),
                       "vicreg": ("proj_hidden_dim", "proj_output_dim")}.items():
        overrides += [f"method.{base}.{dim}=16" for dim in dims]
    return overrides


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=valid_configs(), seed=st.integers(min_value=0, max_value=2**16))
def test_every_valid_config_builds_and_trains_a_step(overrides, seed):
    config = load_config(None, overrides)
    torch.manual_seed(seed)
    method = build_method(config)
    train = config.train
    optimizer = build_optimizer(train.optimizer, method.parameter_groups(train.optimizer),
                                lr=train.lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(8, 3, 16, 16, generator=generator) for _ in range(method.num_views)]
    output = training_step(method, optimizer, Batch.from_views(*views),
                           torch.Generator().manual_seed(seed), 0.0)
    assert torch.isfinite(output.loss), overrides
