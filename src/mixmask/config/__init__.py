"""Typed, validated run configuration.

YAML files select and override; every key lives in a dataclass below with the paper's
default. Command-line overrides are ``section.key=value`` (values parsed as YAML). An
unknown or mistyped key is a :class:`ConfigError` that names it and the closest valid key.

A YAML file may start with ``base: other.yaml`` or ``base: [a.yaml, b.yaml]`` (relative
to the file; later ones override earlier ones) to inherit and override other configs, so a
recipe variant is a one-screen fragment, and a base x masking config is one line that
composes a recipe with a masking fragment (configs/make_matrix.py).
"""

from mixmask.config.loading import (
    RECIPES_DIR,
    load_config,
    read_recipe,
    recipe_names,
    resolve_recipe,
    save_config,
    yaml_problem,
)
from mixmask.config.scenarios import ScenarioConfig
from mixmask.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    MonitorConfig,
    TrainConfig,
)
from mixmask.config.transfer import TransferConfig
from mixmask.config.validation import validate

__all__ = ["RECIPES_DIR", "Config", "DataConfig", "EvalConfig", "MethodConfig", "ModelConfig",
           "MonitorConfig", "ScenarioConfig", "TrainConfig", "TransferConfig", "load_config",
           "read_recipe", "recipe_names", "resolve_recipe", "save_config", "validate",
           "yaml_problem"]
