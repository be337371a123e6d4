"""The `imf` command line (its contract: docs/architecture.md).

imf precompute [-e EXPERIMENT] [key=value ...]
imf train      [-e EXPERIMENT] [key=value ...]
imf evaluate   [-e EXPERIMENT] [key=value ...]
imf run        [-e EXPERIMENT] [key=value ...]
imf sweep SWEEP [--scale smoke|paper] [key=value ...]
imf report SWEEP_OR_RUN
imf check      [-e EXPERIMENT] [key=value ...]   # the input files, before any work
imf --version
Every command takes --config-dir DIR: the team's configs, over the shipped ones.
Its grammar and help: flows.cli_parser; what a finished run prints: flows.run_printout.
"""

from __future__ import annotations

import argparse
import sys

from flows.cli_parser import build_parser, team_configs
from flows.run_printout import print_results, print_where_to_look


def print_plan(title: str, configs: dict, args: argparse.Namespace) -> int:
    from flows.plan import plan_of

    print(plan_of(title, configs, args.gpu, args.mfu, args.images).text())
    return 0


def run_precompute(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.inputs import reads_of, require_inputs
    from tasks.precompute import PrecomputeJob, precompute

    cfg = load_config(args.experiment, args.overrides)
    require_inputs(cfg, reads_of(cfg, ["precompute"]))
    result = precompute(PrecomputeJob.of(cfg))
    if result.computed:
        print(f"precompute: computed {len(result.shards_written)} shard(s), {result.num_rows} rows")
    else:
        print(f"precompute: reused, {result.num_rows} rows")
    if result.skipped:
        print(
            f"precompute: skipped {len(result.skipped)} unreadable image(s):",
            *result.skipped,
            sep="\n  ",
        )
    print(result.out.uri)
    return 0


def upstream(cfg, stage: str):
    """The stages before `stage` of the composed `cfg`, run or reused (the single-stage
    commands), after the checks of what they read."""
    from tasks.inputs import reads_of, require_inputs
    from tasks.precompute import PrecomputeJob, precompute
    from tasks.tracking import prepare
    from tasks.train import TrainJob, train

    if stage == "train":
        prepare(cfg)
        require_inputs(cfg, reads_of(cfg, ["precompute", "train"]))
    pre = precompute(PrecomputeJob.of(cfg))
    print(f"precompute: {'computed' if pre.computed else 'reused'} {pre.out.uri}")
    if stage == "train":
        return pre, None
    trained = train(TrainJob.of(cfg, pre))
    print(f"train: {'trained' if trained.computed else 'reused'} {trained.out.uri}")
    return pre, trained


def run_train(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.train import TrainJob, train

    cfg = load_config(args.experiment, args.overrides)
    pre, _ = upstream(cfg, "train")
    result = train(TrainJob.of(cfg, pre))
    state = "trained" if result.computed else "reused"
    print(f"train: {state}, {result.steps} steps, MLflow run {result.mlflow_run_id}")
    print(result.out.uri)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.eval_inputs import checkpoint_source, needs_precompute, preflight
    from tasks.evaluate import EvalJob, evaluate
    from tasks.precompute import PrecomputeJob, precompute

    cfg = load_config(args.experiment, args.overrides)
    preflight(cfg)
    if cfg.eval.checkpoint:  # given weights: no training; precompute only if its outputs count
        source = checkpoint_source(cfg)
        pre = None
        if needs_precompute(cfg):
            pre = precompute(PrecomputeJob.of(cfg))
            print(f"precompute: {'computed' if pre.computed else 'reused'} {pre.out.uri}")
        print(f"checkpoint: {source.weights} (key {source.key})")
        result = evaluate(EvalJob.of(cfg, pre), source)
    else:
        pre, trained = upstream(cfg, "evaluate")  # preflight above checked what they read
        result = evaluate(EvalJob.of(cfg, pre), trained)
    state = f"computed {result.units_computed} unit(s)" if result.computed else "reused"
    print(f"evaluate: {state}")
    print_results(result.results, result.stale)
    print(result.out.uri)
    return 0


def run_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_pipeline
    from tasks.config import load_config

    if args.plan:
        cfg = load_config(args.experiment, args.overrides)
        return print_plan(f"imf run -e {args.experiment}", {args.experiment: cfg}, args)

    result = run_pipeline(args.experiment, args.overrides)
    for stage in ("precompute", "train", "evaluate"):
        print(f"{stage}: {result.stages[stage]:<8} {getattr(result, stage).out.uri}")
    print_results(result.evaluate.results, result.evaluate.stale)
    print_where_to_look(result.config, result)
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    from flows.sweep import run_sweep
    from flows.sweep_config import load_sweep, variant_configs

    only = [v for v in args.only.split(",") if v]
    if args.plan:
        sweep = load_sweep(args.sweep)
        configs = variant_configs(sweep, args.scale, args.overrides, only, args.seeds)
        return print_plan(f"sweep {sweep.name}, scale {args.scale}", configs, args)
    result = run_sweep(
        args.sweep,
        args.scale,
        args.overrides,
        only,
        args.concurrency,
        args.seeds,
        args.allow_dirty,
    )
    print(f"sweep {result.sweep} ({result.scale}): MLflow parent run {result.parent_run_id}")
    for v in result.variants:
        fid = f"best FID {v.fid_best:.3f}" if v.fid_best is not None else f"FAILED: {v.error}"
        fid += "  DID NOT LEARN (see the report's calibration)" if v.did_not_learn else ""
        fid += "  IGNORES OMEGA" if v.ignores_omega else ""
        fid += "  STALE (imf_core method version; see the report)" if v.stale else ""
        print(f"  {v.name:<20} {fid}")
    print(f"next: imf report {result.sweep} --scale {result.scale}")
    return 1 if result.failed else 0


def run_report(args: argparse.Namespace) -> int:
    from flows.pipeline import check_prefect
    from flows.report import report_flow
    from flows.report_runs import find_parent
    from tasks.config import load_config
    from tasks.tracking import check_reachable, tracking_uri
    from tasks.tracking_client import client as tracking_client

    cfg = load_config("smoke", args.overrides)  # only tracking.* and paths.* matter here
    uri = tracking_uri(cfg)
    check_reachable(uri)  # and the login
    check_prefect()
    find_parent(tracking_client(uri), args.target, args.scale)  # a clear error before Prefect
    report = report_flow(args.target, args.scale, uri, cfg.paths.artifacts)
    print(report.markdown)
    for path in report.files:
        print(path)
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Every input the experiment names, one line each (an image sample decoded too); exit 1
    when any is wrong. Starts nothing and needs no server."""
    from tasks.config import load_config
    from tasks.inputs import check_inputs, report

    cfg = load_config(args.experiment, args.overrides)
    findings = check_inputs(cfg, full=True)
    print(report(findings) if findings else f"{args.experiment}: names no input files to check")
    return 0 if all(f.ok for f in findings) else 1


COMMANDS = {
    "precompute": run_precompute,
    "train": run_train,
    "evaluate": run_evaluate,
    "run": run_run,
    "sweep": run_sweep_command,
    "report": run_report,
    "check": run_check,
}


def main(argv: list[str] | None = None) -> int:
    from tasks.cluster import quiet_known_warnings

    quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else argv
    with team_configs(argv):
        return run_command(argv)


def run_command(argv: list[str]) -> int:
    from tasks.config import ConfigError

    try:
        parser = build_parser()
    except ConfigError as err:  # a --config-dir that is not a directory
        print(f"imf: error: {err}", file=sys.stderr)
        return 2
    # key=value overrides may follow options (`imf sweep t --scale smoke k=v`): argparse binds
    # a trailing positional list at its first position, so the rest arrive as extras.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if getattr(args, "recompute_stale", False):
        args.overrides.append("paths.recompute_stale=true")
    from tasks import cluster, preemption

    # A Ray this process had connected to before (a test session's) is its starter's to end.
    callers_ray = cluster.connected()
    preemption.install()  # SIGTERM / Ctrl-C: checkpoint, end cleanly, exit 128 + signal
    try:
        return COMMANDS[args.command](args)
    except preemption.Preempted as stop:
        print(f"imf {args.command}: {stop.reason}: stopped; relaunch to resume", file=sys.stderr)
        return stop.exit_code
    except (ConfigError, FileNotFoundError, LookupError, ValueError, OSError) as err:
        # (ConnectionError, an unreachable tracking server, is an OSError)
        print(f"imf {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if not callers_ray:
            cluster.shutdown_ray()  # nothing of the command's Ray outlives it


if __name__ == "__main__":
    sys.exit(main())
