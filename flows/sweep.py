"""A paper table as a sweep: one pipeline per ablation variant, an MLflow parent run over them.

    imf sweep table1a --scale smoke [--only mf,imf_aux] [--concurrency 2] [key=value ...]
    >>> result = run_sweep("table1a", "smoke")

`configs/sweep/<name>.yaml` holds the table: its columns, the settings of each scale (an
experiment plus overrides), and the variants (overrides per variant and per scale, and which
metric fills which cell, with the paper's value beside it). Every variant is an ordinary
pipeline config, so variants that agree on a stage share its output through the content keys
(one precompute for the whole sweep; Tab. 1b reuses Tab. 1a's trainings). The sweep is an
MLflow parent run; each variant's training run is nested under it (tags: sweep, table, row,
variant) and carries its evaluation's best FID. Variants run `concurrency` at a time; one that
fails is reported and the others go on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from prefect import flow, tags
from prefect.task_runners import ThreadPoolTaskRunner

from flows.gpu_memory import check_gpu_memory
from flows.pipeline import RETRIES, check_prefect, results_beside, stage_names, start_ray
from tasks import preemption
from tasks.artifacts import content_key
from tasks.config import ConfigError, config_file, load_config
from tasks.eval_inputs import preflight
from tasks.evaluate import EvalJob, evaluate_task
from tasks.precompute import PrecomputeJob, precompute_task
from tasks.provenance import require_clean_tree
from tasks.schema import ExperimentConfig
from tasks.tracking import open_run, tracking_uri
from tasks.tracking_client import client as tracking_client
from tasks.train import TrainJob, train_task


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


# ------------------------------------------------------------------ the parent run
def sweep_dir(sweep: SweepConfig, scale: str, overrides: list[str], cfg, seeds: int = 1) -> Path:
    """Where a sweep run keeps its MLflow run ids: one per (sweep, scale, overrides, seeds)."""
    what = {"sweep": sweep.name, "scale": scale, "overrides": overrides}
    what |= {"seeds": seeds} if seeds > 1 else {}
    return Path(cfg.paths.artifacts).resolve() / "sweep" / content_key("sweep", what)


def parent_run(sweep: SweepConfig, scale: str, overrides: list[str], cfg, seeds: int = 1) -> str:
    """The sweep's MLflow parent run, created once per (sweep, scale, overrides, seeds) and
    found again on a rerun (its id is kept under <artifacts>/sweep/<key>/)."""
    tags = {
        "sweep": sweep.name,
        "sweep.file": sweep.file,
        "scale": scale,
        "stage": "sweep",
        "seeds": str(seeds),
        "mlflow.note.content": sweep.title,
    }
    return open_run(
        tracking_uri(cfg),
        sweep_dir(sweep, scale, overrides, cfg, seeds) / "mlflow_run_id",
        cfg.tracking.experiment,
        f"{sweep.name}/{scale}",
        tags,
        lambda: {"overrides": " ".join(overrides) or "-", "seeds": str(seeds)},
    )


def variant_group_run(parent: str, variant, scale: str, directory: Path, cfg) -> str:
    """With several seeds: a run per variant under the parent, its seeds' runs under it."""
    tags = {"mlflow.parentRunId": parent, "stage": "variant", "variant": variant.name}
    tags |= {"row": variant.row, "scale": scale}
    return open_run(
        tracking_uri(cfg),
        directory / variant.name / "mlflow_run_id",
        cfg.tracking.experiment,
        variant.name,
        tags,
        dict,
    )


# ------------------------------------------------------------------ the flow
@dataclass
class VariantOutcome:
    name: str
    status: str  # "ok" | "failed"
    train_run_id: str = ""
    eval_run_id: str = ""
    fid_best: float | None = None
    error: str = ""
    did_not_learn: bool | None = None
    ignores_omega: bool | None = None
    stale: str = ""  # tasks.artifacts.stale of its evaluation (or its training)


@dataclass
class SweepResult:
    sweep: str
    scale: str
    parent_run_id: str
    variants: list[VariantOutcome]

    @property
    def failed(self) -> list[VariantOutcome]:
        return [v for v in self.variants if v.status != "ok"]


@flow(name="imf-sweep", flow_run_name="sweep {name}/{scale}", log_prints=True)
def sweep_flow(
    name: str,
    scale: str = "smoke",
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    seeds: int = 1,
    allow_dirty: bool = False,
    composed: dict[str, ExperimentConfig] | None = None,
) -> SweepResult:
    """Runs every variant's pipeline (shared stages once) under one MLflow parent run; with
    several seeds, each variant's seeds under a run of that variant. `composed`: the variants'
    configs, already checked (run_sweep), else composed and checked here (a deployment's)."""
    preemption.reinstall()  # over Prefect's SIGTERM handler, which would let trainings run on
    overrides, only = overrides or [], only or []
    if composed is not None:
        sweep, configs = load_sweep(name), composed
    else:
        sweep, configs = checked_sweep(name, scale, overrides, only, seeds, allow_dirty)
    first = next(iter(configs.values()))
    parent = parent_run(sweep, scale, overrides, first, seeds)
    groups = {}
    if seeds > 1:
        directory = sweep_dir(sweep, scale, overrides, first, seeds)
        for v in sweep.variants:
            if not only or v.name in only:
                groups[v.name] = variant_group_run(parent, v, scale, directory, first)
    for cfg in configs.values():
        cfg.tracking.tags["mlflow.parentRunId"] = groups.get(cfg.tracking.tags["variant"], parent)
    try:
        return run_variants(sweep, scale, configs, parent, groups, first)
    except preemption.Preempted as stop:  # a signal: the sweep's runs end KILLED, with why
        runs = tracking_client(tracking_uri(first))
        for run in (parent, *groups.values()):
            runs.set_tag(run, "error", stop.reason)
            runs.set_terminated(run, "KILLED")
        raise


def run_variants(sweep, scale: str, configs: dict, parent: str, groups: dict, first):
    """The stages of every variant (shared ones once), then each variant's outcome."""
    # Precompute once per distinct job (usually one for the whole sweep): equal jobs hash alike.
    precomputed, pre_of = {}, {}
    for variant, cfg in configs.items():
        job = PrecomputeJob.of(cfg)
        if job not in precomputed:
            named = stage_names(cfg)
            # return_state: a stage that reused its output returns a "Reused" state, whose
            # .result() is the stage's result (a direct call would hand back the state)
            precomputed[job] = precompute_task.with_options(**RETRIES, **named["precompute"])(
                job, return_state=True
            ).result()
        pre_of[variant] = precomputed[job]
    evaluations, jobs = {}, {}
    for variant, cfg in configs.items():
        named = stage_names(cfg)
        jobs[variant] = TrainJob.of(cfg, pre_of[variant])
        trained = train_task.with_options(**RETRIES, **named["train"]).submit(jobs[variant])
        evaluated = evaluate_task.with_options(**RETRIES, **named["evaluate"]).submit(
            EvalJob.of(cfg, pre_of[variant]), trained
        )
        evaluations[variant] = (trained, evaluated)

    client = tracking_client(tracking_uri(first))
    outcomes = []
    for variant, (trained, evaluated) in evaluations.items():
        try:
            trained.result()  # a training failure is the one to report
            result = evaluated.result()
        except Exception as err:  # reported, and the other variants go on
            train_run = read_run_id(jobs[variant].out)
            outcome = VariantOutcome(
                variant, "failed", train_run, error=f"{type(err).__name__}: {err}"
            )
            print(f"variant {variant}: FAILED: {outcome.error}")
        else:
            train_run = read_run_id(jobs[variant].out)
            best = next(r for r in result.results if r["best"])
            outcome = VariantOutcome(variant, "ok", train_run, result.mlflow_run_id, best["fid"])
            outcome.did_not_learn = best.get("did_not_learn")
            outcome.ignores_omega = best.get("ignores_omega")
            outcome.stale = result.stale
            flag = "  DID NOT LEARN" if outcome.did_not_learn else ""
            flag += "  IGNORES OMEGA" if outcome.ignores_omega else ""
            flag += f"  STALE: {result.stale}" if result.stale else ""
            print(f"variant {variant}: best FID {best['fid']:.3f} at omega {best['omega']:g}{flag}")
        outcomes.append(outcome)
        tags = {
            f"variant.{variant}": outcome.train_run_id,
            f"variant.{variant}.eval": outcome.eval_run_id,
        }
        for key, value in tags.items():
            client.set_tag(parent, key, value or "-")
        client.set_tag(parent, f"variant.{variant}.status", outcome.status)
    summary = [o.__dict__ for o in outcomes]
    client.log_text(parent, json.dumps(summary, indent=2), "variants.json")
    failed = [o for o in outcomes if o.status != "ok"]
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    for group in groups.values():
        client.set_terminated(group, "FINISHED")
    return SweepResult(sweep.name, scale, parent, outcomes)


def read_run_id(train_dir: Path) -> str:
    """The MLflow run a training created ("" if it failed before creating one)."""
    id_file = train_dir / "mlflow_run_id"
    return id_file.read_text().strip() if id_file.is_file() else ""


def run_sweep(
    name: str,
    scale: str = "smoke",
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    concurrency: int = 1,
    seeds: int = 1,
    allow_dirty: bool = False,
) -> SweepResult:
    """`imf sweep`: checks every variant's config first, then runs the flow with `concurrency`
    variants at a time (threads; each stage's heavy work runs in Ray or its own workers)."""
    overrides, only = overrides or [], only or []
    _, configs = checked_sweep(name, scale, overrides, only, seeds, allow_dirty)
    check_prefect()
    start_ray(list(configs.values()))
    # Two threads per variant: its evaluation task waits on its training in a thread of its own.
    runner = ThreadPoolTaskRunner(max_workers=2 * max(1, concurrency))
    with results_beside(next(iter(configs.values())).paths.artifacts):
        with tags("imf", f"sweep:{name}", f"scale:{scale}"):
            flow = sweep_flow.with_options(task_runner=runner)
            return flow(name, scale, overrides, only, seeds, allow_dirty, composed=configs)
