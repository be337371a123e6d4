"""Experiment configs: OmegaConf, composed and checked against dataclass schemas.

    >>> cfg = load_config("smoke", ["precompute.rows_per_shard=512"])

Composition: configs/base.yaml <- configs/data/<data>.yaml <- configs/experiment/<name>.yaml
<- dot-list overrides. `defaults.data` (base or experiment) picks the data file. An unknown or
mistyped key is an error naming the key and the file it came from. Model presets live in code
(imf_core.models.PRESETS); `model.name` picks one and any other `model.*` key overrides it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from imf_core.guidance import GuidanceConfig
from imf_core.models.config import ModelConfig
from imf_core.objectives import ObjectiveConfig
from imf_core.training import OptimConfig
from tasks.evaluate import EvalConfig
from tasks.precompute import DataConfig, PrecomputeConfig, TokenizerConfig
from tasks.resolve import model_config, to_dict  # noqa: F401 (the config's public helpers)
from tasks.train import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be composed: names the key and the file."""


# model: a preset name plus optional overrides of any ModelConfig field (None = the preset's).
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("name", str, field(default="tiny"))]
    + [
        (name, Optional[kind], field(default=None))  # noqa: UP045 (OmegaConf reads Optional)
        for name, kind in get_type_hints(ModelConfig).items()
    ],
)


@dataclass
class Defaults:
    data: str = "digits"  # configs/data/<data>.yaml


@dataclass
class PathsConfig:
    artifacts: str = "artifacts"  # where every stage writes its content-addressed outputs


@dataclass
class TrackingConfig:
    uri: str = ""  # else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = ""  # MLflow experiment name; "" = the experiment config's name
    tags: dict[str, str] = field(default_factory=dict)  # e.g. the ablation table and row
    run_name: str = ""  # the training run's name; "" = "<experiment> <model> <objective>"


@dataclass
class ExperimentConfig:
    name: str = ""
    defaults: Defaults = field(default_factory=Defaults)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    model: Any = field(default_factory=ModelSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(err).splitlines()[0]
        if isinstance(err, ConfigKeyError):  # the key is not in the schema
            raise ConfigError(f"{where}: unknown key {key!r}: {message}") from err
        if "is not a ListConfig" in message:
            message = f"a list is needed, e.g. {key}=[1.0,2.0]"
        value = OmegaConf.select(layer, key) if isinstance(layer, DictConfig) else None
        raise ConfigError(f"{where}: bad value {value!r} for {key!r}: {message}") from err


def _parse_overrides(overrides: list[str]) -> DictConfig:
    """key=value pairs; a word without '=' (`train.steps 100`) is refused, naming the form."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} has no value: write key=value (e.g. train.steps=100), "
                "no spaces around '='"
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides: {str(err).splitlines()[0]}") from err


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.stem, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"no config file {path} ({hint}known: {', '.join(known)})")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's parser errors: one line naming the file and the place
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}") from err


def load_config(
    experiment: str, overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR
) -> ExperimentConfig:
    """Composes the experiment config and returns it as checked dataclasses."""
    schema = OmegaConf.structured(ExperimentConfig)
    base = _merge(schema, _load_yaml(config_dir / "base.yaml"), "configs/base.yaml")
    exp_file = config_dir / "experiment" / f"{experiment}.yaml"
    exp = _load_yaml(exp_file)
    cli = _parse_overrides(list(overrides or []))
    data_name = (
        OmegaConf.select(cli, "defaults.data")
        or OmegaConf.select(exp, "defaults.data")
        or base.defaults.data
    )
    cfg = _merge(
        base,
        _load_yaml(config_dir / "data" / f"{data_name}.yaml"),
        f"configs/data/{data_name}.yaml",
    )
    cfg = _merge(cfg, exp, f"configs/experiment/{experiment}.yaml")
    cfg = _merge(cfg, cli, "command-line overrides")
    cfg.name = experiment
    try:
        result = OmegaConf.to_object(cfg)
        model_config(result)  # the model preset and its overrides, checked now
    except KeyError as err:
        raise ConfigError(f"model.name: {err.args[0]}") from err
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(f"experiment {experiment!r}: {err}") from err
    return result
