"""A sweep file and the variants it expands to: `configs/sweep/<name>.yaml` read against its
schema (load_sweep), each variant's experiment config (variant_configs), all of them checked
before any work (checked_sweep), and the comparisons the paper's table makes between variants.

The file holds the table: its columns, the settings of each scale (an experiment plus
overrides), and the variants (overrides per variant and per scale, and which metric fills which
cell, with the paper's value beside it). Every variant is an ordinary pipeline config; running
them: flows.sweep.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flows.gpu_memory import check_gpu_memory
from tasks.config import ConfigError, config_file, load_config
from tasks.eval_inputs import preflight
from tasks.provenance import require_clean_tree
from tasks.schema import ExperimentConfig


# ------------------------------------------------------------------ the sweep file's schema
@dataclass
class Cell:
    metric: str = "fid_best"  # an MLflow metric of the variant's evaluation (or training) run
    paper: Optional[float] = None  # noqa: UP045 (OmegaConf reads Optional)


@dataclass
class Variant:
    name: str = "???"
    row: str = "???"  # the table row this variant fills (several variants may share a row)
    overrides: list[str] = field(default_factory=list)
    scale_overrides: dict[str, list[str]] = field(default_factory=dict)
    cells: dict[str, Cell] = field(default_factory=dict)  # column -> what fills it
    # One factor at a time: the variant this one is compared with in the paper's table, and the
    # resolved config keys allowed to differ from it (the factor the paper ablates there, plus
    # what the paper changes with it). tests/test_flows.py diffs them at every scale.
    compare_with: str = ""
    factor: list[str] = field(default_factory=list)


@dataclass
class Scale:
    experiment: str = "smoke"
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    name: str = ""
    file: str = ""  # where it was read from (set by load_sweep)
    title: str = ""
    columns: list[str] = field(default_factory=list)
    scales: dict[str, Scale] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    # A study of ours, not one of the paper's tables: no paper numbers beside its cells, and no
    # paper scale needed (configs/sweep/omega_study.yaml).
    study: bool = False


def load_sweep(name: str) -> SweepConfig:
    """configs/sweep/<name>.yaml (from the team's config directories or the shipped ones) or a
    path to a sweep file, checked against the schema."""
    if name.endswith(".yaml"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"no sweep file {name}")
    else:
        path = config_file("sweep", name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path))
        sweep = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from err
    sweep.name, sweep.file = path.stem, str(path.resolve())
    for v in sweep.variants:
        unknown = set(v.cells) - set(sweep.columns)
        if unknown:
            raise ConfigError(f"{path}: variant {v.name!r} fills unknown column(s) {unknown}")
    names = {v.name for v in sweep.variants}
    if len(names) != len(sweep.variants):
        raise ConfigError(f"{path}: variant names must be unique")
    if sweep.study and any(c.paper is not None for v in sweep.variants for c in v.cells.values()):
        raise ConfigError(f"{path}: a study has no paper numbers beside its cells")
    for v in sweep.variants:
        if v.compare_with and v.compare_with not in names:
            raise ConfigError(
                f"{path}: variant {v.name!r} compares with unknown {v.compare_with!r}"
            )
    return sweep


def resolved(cfg) -> dict[str, str]:
    """Everything that decides what a variant computes, flattened: the config with the model
    section resolved to the preset's full ModelConfig (tracking, names and how the training
    runs, e.g. its workers and micro-batches, left out)."""
    from tasks.tracking import flatten
    from tasks.train import RUNTIME_ONLY

    d = cfg.to_dict()
    for k in ("name", "tracking", "paths"):
        d.pop(k, None)
    d["model"].pop("name")  # the preset's name: its resolved fields are what count
    for k in RUNTIME_ONLY:
        d["train"].pop(k)
    return flatten(d)


def config_diff(a, b) -> set[str]:
    """The resolved keys whose values differ between two variant configs."""
    ra, rb = resolved(a), resolved(b)
    return {k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)}


# Cells that describe the network rather than what it learned (Tab. 1c's parameter counts):
# the same for every seed, so shown once, never flagged did-not-learn, never t-tested.
MODEL_PROPERTIES = ("params_m",)


def comparisons(sweep: SweepConfig) -> list[tuple[Variant, Variant, str, str]]:
    """Each comparison a variant's cells make in the paper's table: (variant, other, its
    column, other's column). Column by column against the row it is compared with; a column
    that variant of the row lacks comes from the row's other variant (Tab. 1b's "fixed omega"
    row is two trainings, w/o and w/ CFG). No shared column: first measured cell against first
    measured cell (a CFG row against its own no-CFG twin; Tab. 2's 2-NFE against 1-NFE)."""

    def first_measured(v: Variant) -> str | None:
        return next((c for c, cell in v.cells.items() if cell.metric not in MODEL_PROPERTIES), None)

    by_name = {v.name: v for v in sweep.variants}
    pairs = []
    for v in sweep.variants:
        other = by_name.get(v.compare_with)
        if other is None:
            continue
        row = [other] + [w for w in sweep.variants if w.row == other.row and w not in (v, other)]
        found = []
        for column in v.cells:
            match = next((w for w in row if column in w.cells), None)
            if match is not None:
                found.append((v, match, column, column))
        mine, theirs = first_measured(v), first_measured(other)
        if not found and mine and theirs:
            found = [(v, other, mine, theirs)]
        pairs += found
    return pairs


def variant_configs(
    sweep: SweepConfig, scale: str, overrides: list[str], only: list[str], seeds: int = 1
) -> dict[str, ExperimentConfig]:
    """The experiment config of every (selected) variant, and of every training seed of it
    (`seeds` > 1: labels "<variant>.s<seed>", seeds train.seed, train.seed + 1, ...); any bad
    one is an error up front."""
    if scale not in sweep.scales:
        raise ConfigError(f"sweep {sweep.name!r} has no scale {scale!r} ({sorted(sweep.scales)})")
    unknown = set(only) - {v.name for v in sweep.variants}
    if unknown:
        raise ConfigError(
            f"sweep {sweep.name!r} has no variant(s) {sorted(unknown)} "
            f"(its variants: {', '.join(v.name for v in sweep.variants)})"
        )
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    s = sweep.scales[scale]
    configs = {}
    for v in sweep.variants:
        if only and v.name not in only:
            continue
        layers = s.overrides + v.overrides + v.scale_overrides.get(scale, []) + overrides
        try:
            cfg = load_config(s.experiment, layers)
        except ConfigError as err:
            raise ConfigError(f"sweep {sweep.name!r}, variant {v.name!r}: {err}") from err
        base_seed = cfg.train.seed
        for k in range(seeds):
            seeded = copy.deepcopy(cfg)
            seeded.train.seed = base_seed + k
            label = v.name if seeds == 1 else f"{v.name}.s{seeded.train.seed}"
            seeded.tracking.experiment = cfg.tracking.experiment or f"sweep-{sweep.name}"
            seeded.tracking.tags |= {"sweep": sweep.name, "scale": scale, "row": v.row}
            seeded.tracking.tags |= {"variant": v.name, "seed": str(seeded.train.seed)}
            seeded.tracking.run_name = (
                v.name if seeds == 1 else f"{v.name} seed {seeded.train.seed}"
            )
            configs[label] = seeded
    return configs


def checked_sweep(
    name: str,
    scale: str,
    overrides: list[str],
    only: list[str],
    seeds: int = 1,
    allow_dirty: bool = False,
) -> tuple[SweepConfig, dict[str, ExperimentConfig]]:
    """The sweep and its variants' configs, checked before any work: a paper-scale sweep runs
    from committed code only (tasks.provenance), and every variant's keys, values, files,
    servers and per-GPU batch are checked. The flow runs it first, so that `imf sweep`, a
    deployment and a Python call are refused alike; `imf sweep` runs it once more before a
    Prefect server starts."""
    if scale == "paper" and not allow_dirty:
        require_clean_tree()
    sweep = load_sweep(name)
    configs = variant_configs(sweep, scale, overrides, only, seeds)
    check_gpu_memory(configs.values())
    for cfg in configs.values():
        preflight(cfg)
    return sweep, configs
