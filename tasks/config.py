"""Experiment configs: OmegaConf, composed and checked against dataclass schemas.

    >>> cfg = load_config("smoke", ["precompute.rows_per_shard=512"])

Composition: configs/base.yaml <- configs/data/<data>.yaml <- configs/experiment/<name>.yaml
<- dot-list overrides. `defaults.data` (base or experiment) picks the data file. An unknown or
mistyped key is an error naming the key and the file it came from. Each file is looked up
first in the team's directories (`--config-dir`, IMF_CONFIG_DIR), then in the configs shipped
with the package, so a team adds or replaces an experiment, dataset or sweep without forking.
Model presets live in code (imf_core.models.PRESETS); `model.name` picks one and any other
`model.*` key overrides it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
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
from tasks.inputs import InputsConfig
from tasks.precompute import DataConfig, PrecomputeConfig, TokenizerConfig
from tasks.resolve import model_config, to_dict  # noqa: F401 (the config's public helpers)
from tasks.train import TrainConfig

CONFIG_DIR = Path(str(importlib.resources.files("configs")))  # shipped with the package
CONFIG_PATH_ENV = "IMF_CONFIG_DIR"  # the team's config directories, os.pathsep-separated


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
    # Recompute a training or evaluation made by another imf_core.METHOD_VERSION (or from a
    # training recomputed since) instead of reusing it with a warning; the old one is kept
    # under <artifacts>/stale/. Not part of any content key. CLI: --recompute-stale.
    recompute_stale: bool = False


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
    inputs: InputsConfig = field(default_factory=InputsConfig)  # what the input files must be


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


def config_dirs() -> list[Path]:
    """Where config files are looked up, first match wins: the team's directories
    (IMF_CONFIG_DIR; `--config-dir` sets it for a command), then the shipped configs."""
    paths = os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep)
    team = [Path(p).expanduser() for p in paths if p]
    for folder in team:
        if not folder.is_dir():
            raise ConfigError(f"{CONFIG_PATH_ENV} / --config-dir: {folder} is not a directory")
    return [*team, CONFIG_DIR]


def known_configs(kind: str, dirs: list[Path] | None = None) -> list[str]:
    """The names of `kind` ("experiment", "data", "sweep") in every config directory."""
    return sorted({p.stem for d in dirs or config_dirs() for p in (d / kind).glob("*.yaml")})


def config_file(kind: str, name: str, dirs: list[Path] | None = None) -> Path:
    """`<kind>/<name>.yaml` from the first directory that has it; else an error listing the
    known names (and the closest one)."""
    dirs = dirs or config_dirs()
    for folder in dirs:
        path = folder / kind / f"{name}.yaml"
        if path.is_file():
            return path
    known = known_configs(kind, dirs)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = ", ".join(str(d / kind) for d in dirs)
    raise ConfigError(
        f"no {kind or 'config'} {name!r} ({hint}known: {', '.join(known)}; looked in {where})"
    )


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's parser errors: one line naming the file and the place
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}") from err


def load_config(
    experiment: str, overrides: list[str] | None = None, config_dir: Path | None = None
) -> ExperimentConfig:
    """Composes the experiment config and returns it as checked dataclasses. `config_dir`:
    read that directory only (default: config_dirs())."""
    dirs = [config_dir] if config_dir else config_dirs()
    schema = OmegaConf.structured(ExperimentConfig)
    base_file = config_file("", "base", dirs)
    base = _merge(schema, _load_yaml(base_file), str(base_file))
    exp_file = config_file("experiment", experiment, dirs)
    exp = _load_yaml(exp_file)
    cli = _parse_overrides(list(overrides or []))
    data_name = (
        OmegaConf.select(cli, "defaults.data")
        or OmegaConf.select(exp, "defaults.data")
        or base.defaults.data
    )
    data_file = config_file("data", data_name, dirs)
    cfg = _merge(base, _load_yaml(data_file), str(data_file))
    cfg = _merge(cfg, exp, str(exp_file))
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
