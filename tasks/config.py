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

import difflib
import importlib.resources
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tasks.schema import ExperimentConfig

CONFIG_DIR = Path(str(importlib.resources.files("configs")))  # shipped with the package
CONFIG_PATH_ENV = "IMF_CONFIG_DIR"  # the team's config directories, os.pathsep-separated


class ConfigError(ValueError):
    """A config that cannot be composed: names the key and the file."""


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
        result.model_config()  # the model preset and its overrides, checked now
    except KeyError as err:
        raise ConfigError(f"model.name: {err.args[0]}") from err
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(f"experiment {experiment!r}: {err}") from err
    return result
