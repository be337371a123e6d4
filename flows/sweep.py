"""A paper table as a sweep: one pipeline per ablation variant, an MLflow parent run over them.

    imf sweep table1a --scale smoke [--only mf,imf_aux] [--concurrency 2] [key=value ...]
    >>> result = run_sweep("table1a", "smoke")

`configs/sweep/<name>.yaml` holds the table (flows.sweep_config reads it and composes each
variant's config). Every variant is an ordinary pipeline config, so variants that agree on a
stage share its output through the content keys (one precompute for the whole sweep; Tab. 1b
reuses Tab. 1a's trainings). The sweep is an MLflow parent run; each variant's training run is
nested under it (tags: sweep, table, row, variant) and carries its evaluation's best FID.
Variants run `concurrency` at a time; one that fails is reported and the others go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect import flow, tags
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import RETRIES, check_prefect, results_beside, stage_names, start_ray
from flows.sweep_config import SweepConfig, checked_sweep, load_sweep
from tasks import preemption
from tasks.artifacts import content_key
from tasks.evaluate import EvalJob, evaluate_task
from tasks.precompute import PrecomputeJob, precompute_task
from tasks.schema import ExperimentConfig
from tasks.storage import Output, Store
from tasks.tracking import kept_run_id, open_run, tracking_uri
from tasks.tracking_client import client as tracking_client
from tasks.train import TrainJob, train_task


# ------------------------------------------------------------------ the parent run
def sweep_output(
    sweep: SweepConfig, scale: str, overrides: list[str], cfg, seeds: int = 1
) -> Output:
    """Where a sweep run keeps its MLflow run ids: one per (sweep, scale, overrides, seeds)."""
    what = {"sweep": sweep.name, "scale": scale, "overrides": overrides}
    what |= {"seeds": seeds} if seeds > 1 else {}
    return Store.of(cfg.paths.artifacts).output("sweep", content_key("sweep", what))


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
        sweep_output(sweep, scale, overrides, cfg, seeds),
        cfg.tracking.experiment,
        f"{sweep.name}/{scale}",
        tags,
        lambda: {"overrides": " ".join(overrides) or "-", "seeds": str(seeds)},
    )


def variant_group_run(parent: str, variant, scale: str, sweep_out: Output, cfg) -> str:
    """With several seeds: a run per variant under the parent, its seeds' runs under it."""
    tags = {"mlflow.parentRunId": parent, "stage": "variant", "variant": variant.name}
    tags |= {"row": variant.row, "scale": scale}
    return open_run(
        tracking_uri(cfg),
        sweep_out.child(variant.name),
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
        sweep_out = sweep_output(sweep, scale, overrides, first, seeds)
        for v in sweep.variants:
            if not only or v.name in only:
                groups[v.name] = variant_group_run(parent, v, scale, sweep_out, first)
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
            train_run = kept_run_id(jobs[variant].out)  # "" if it failed before making one
            outcome = VariantOutcome(
                variant, "failed", train_run, error=f"{type(err).__name__}: {err}"
            )
            print(f"variant {variant}: FAILED: {outcome.error}")
        else:
            train_run = kept_run_id(jobs[variant].out)
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
