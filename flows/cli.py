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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

HELP = {
    "precompute": "latent precomputation to Parquet",
    "train": "distributed training on Ray Train",
    "evaluate": "sharded FID/IS evaluation",
    "run": "the whole pipeline flow (Prefect)",
    "sweep": "a paper table as an ablation sweep (configs/sweep/)",
    "report": "paper-style tables and plots from MLflow",
    "check": "the experiment's input files (data, VAE, Inception, reference, checkpoint)",
}


def configs_in(folder: str) -> list[str]:
    from tasks.config import known_configs

    return known_configs(folder)


def version() -> str:
    """The package's version and the code it runs (tasks.provenance: a checkout or the build's
    record)."""
    from importlib.metadata import version as installed

    from tasks.provenance import describe_code

    return f"imf-pipeline {installed('imf-pipeline')} ({describe_code()})"


@contextlib.contextmanager
def team_configs(argv: list[str]) -> Iterator[None]:
    """`--config-dir DIR` (repeatable, anywhere on the line) puts DIR over the shipped configs
    for the command and everything it starts, as IMF_CONFIG_DIR does; read before the parser is
    built, so that its experiment and sweep listings include the team's."""
    from tasks.config import CONFIG_PATH_ENV

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-dir", action="append", default=[])
    dirs = pre.parse_known_args(argv)[0].config_dir
    before = os.environ.get(CONFIG_PATH_ENV)
    if dirs:
        os.environ[CONFIG_PATH_ENV] = os.pathsep.join(
            [*map(os.path.abspath, dirs), *([before] if before else [])]
        )
    try:
        yield
    finally:  # a caller's environment (main() called in-process) is left as it was
        if before is None:
            os.environ.pop(CONFIG_PATH_ENV, None)
        else:
            os.environ[CONFIG_PATH_ENV] = before


def sweep_listing() -> str:
    """Each sweep with its scales, for `imf sweep --help`."""
    from flows.sweep_config import load_sweep

    lines = []
    for name in configs_in("sweep"):
        try:
            scales = ", ".join(load_sweep(name).scales)
        except Exception as err:  # a broken sweep file must not break --help
            scales = f"(unreadable: {err})"
        lines.append(f"  {name:<14} scales: {scales}")
    return "\n".join(lines)


OVERRIDES_HELP = (
    "key=value overrides of the composed config, e.g. train.steps=100 eval.omegas=[1.0,2.0] "
    "model.name=tiny (no spaces around '='; lists in brackets)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imf",
        description="Improved MeanFlow experiment pipeline.",
        epilog="example: imf run -e demo train.steps=500    (imf COMMAND --help for more)",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version on one line
    )
    parser.add_argument("--version", action="version", version=version())
    config_dir = argparse.ArgumentParser(add_help=False)
    config_dir.add_argument(
        "--config-dir",
        action="append",
        metavar="DIR",
        help="a directory of the team's configs (base.yaml, data/, experiment/, sweep/) read "
        "before the shipped ones; repeatable; also IMF_CONFIG_DIR",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    experiments = configs_in("experiment")
    for name in ("precompute", "train", "evaluate", "run", "check"):
        sub = commands.add_parser(
            name,
            parents=[config_dir],
            help=HELP[name],
            description=f"{HELP[name]}. Experiments (configs/experiment/): "
            f"{', '.join(experiments)}.",
            epilog=f"example: imf {name} -e demo train.steps=500 train.batch_size=32"
            if name != "check"
            else "example: imf check -e imagenet_b2 data.root=/data/imagenet/train "
            "tokenizer.path=/models/sd-vae-ft-mse",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument(
            "-e",
            "--experiment",
            default="smoke",
            help=f"one of: {', '.join(experiments)} (default: smoke)",
        )
        if name == "run":
            add_plan_options(sub)
        if name in ("train", "evaluate", "run"):
            add_recompute_stale(sub)
        sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    sweep = commands.add_parser(
        "sweep",
        parents=[config_dir],
        help=HELP["sweep"],
        description=f"{HELP['sweep']}. Sweeps and their scales:\n{sweep_listing()}",
        epilog="example: imf sweep table1b --scale smoke --seeds 5 train.steps=800",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("sweep", help=f"one of: {', '.join(configs_in('sweep'))}")
    sweep.add_argument(
        "--scale", default="smoke", help="a scale the sweep file defines (default: smoke)"
    )
    sweep.add_argument("--only", default="", help="comma-separated variant names")
    sweep.add_argument("--concurrency", type=int, default=1, help="variants at a time")
    sweep.add_argument(
        "--seeds", type=int, default=1, help="trainings per variant (train.seed, +1, ...)"
    )
    sweep.add_argument(
        "--allow-dirty",
        action="store_true",
        help="--scale paper: run from uncommitted code (its runs record a hash of the change)",
    )
    add_plan_options(sweep)
    add_recompute_stale(sweep)
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    report = commands.add_parser(
        "report",
        parents=[config_dir],
        help=HELP["report"],
        epilog="example: imf report table1b --scale smoke",
    )
    report.add_argument(
        "target",
        metavar="SWEEP_OR_RUN",
        help=f"a sweep ({', '.join(configs_in('sweep'))}) or a parent run's MLflow id",
    )
    report.add_argument("--scale", default=None, help="pick the latest run at this scale")
    report.add_argument("overrides", nargs="*", metavar="key=value", help="tracking.uri, paths.*")
    return parser


def add_recompute_stale(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--recompute-stale",
        action="store_true",
        help="recompute trainings and evaluations another imf_core method version made, instead "
        "of reusing them with a warning (paths.recompute_stale=true; old outputs kept)",
    )


def add_plan_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--plan",
        action="store_true",
        help="print what would run or be reused, images, FLOPs, GPU-hours and disk; start nothing",
    )
    sub.add_argument(
        "--gpu", default="", help="--plan: GPU-hours at this GPU's measured rates (default h200)"
    )
    sub.add_argument("--mfu", type=float, default=0.0, help="--plan: an assumed MFU instead")
    sub.add_argument(
        "--images", type=int, default=None, help="--plan: the dataset's size, if not readable here"
    )


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
    print(result.path.resolve())
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
    print(f"precompute: {'computed' if pre.computed else 'reused'} {pre.path}")
    if stage == "train":
        return pre, None
    trained = train(TrainJob.of(cfg, pre))
    print(f"train: {'trained' if trained.computed else 'reused'} {trained.path}")
    return pre, trained


def run_train(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.train import TrainJob, train

    cfg = load_config(args.experiment, args.overrides)
    pre, _ = upstream(cfg, "train")
    result = train(TrainJob.of(cfg, pre))
    state = "trained" if result.computed else "reused"
    print(f"train: {state}, {result.steps} steps, MLflow run {result.mlflow_run_id}")
    print(result.path)
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
            print(f"precompute: {'computed' if pre.computed else 'reused'} {pre.path}")
        print(f"checkpoint: {source.weights} (key {source.key})")
        result = evaluate(EvalJob.of(cfg, pre), source)
    else:
        pre, trained = upstream(cfg, "evaluate")  # preflight above checked what they read
        result = evaluate(EvalJob.of(cfg, pre), trained)
    state = f"computed {result.units_computed} unit(s)" if result.computed else "reused"
    print(f"evaluate: {state}")
    print_results(result.results, result.stale)
    print(result.path)
    return 0


def print_results(results: list[dict], stale: str = "") -> None:
    """The grid, then the calibration every number needs beside it, then the verdicts: did
    not learn, ignores omega, and `stale` (tasks.artifacts.stale: not this code's numbers)."""
    from imf_core.guidance import IGNORES_OMEGA_BELOW

    for r in results:
        extra = f"  accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        if "precision" in r:
            extra += f"  precision {r['precision']:.2f}  recall {r['recall']:.2f}"
        star = "  <- best" if r["best"] else ""
        point = f"omega {r['omega']:<5g} [{r['t_min']:g}, {r['t_max']:g}]"
        print(f"  {point}  FID {r['fid']:8.3f}  IS {r['is']:6.3f}{extra}{star}")
    best = next(r for r in results if r["best"])
    print("  calibration (same features, same reference):")
    if "real_data_floor" in best:
        floor, ceiling = best["real_data_floor"], best["class_mean_ceiling"]
        print(f"    real data        FID {floor['fid']:8.3f}   ({floor['rows']})")
        print(f"    class means      FID {ceiling['fid']:8.3f}   (every sample its class's mean)")
    else:
        print("    real data / class means: not computed (no precompute output, or calibrate off)")
    for r in results:
        if "many_step" in r:
            m = r["many_step"]
            point = f"omega {r['omega']:g} [{r['t_min']:g}, {r['t_max']:g}]"
            print(
                f"    {m['steps']}-step Euler   FID {m['fid']:8.3f}   (boundary velocity, {point})"
            )
    if "sensitivity" in best:
        print("  input sensitivity (relative change of u; imf_core.guidance.input_sensitivity):")
        for name, points in best["sensitivity"].items():
            at = "   ".join(f"{point} {value:7.2%}" for point, value in points.items())
            print(f"    {name:<9} {at}")
    if best["did_not_learn"]:
        print(
            "  DID NOT LEARN: accuracy near chance or FID above half the class-mean ceiling; "
            "these numbers say nothing about the method"
        )
    if best.get("ignores_omega"):
        print(
            f"  IGNORES OMEGA: its output moves less with omega than {IGNORES_OMEGA_BELOW:.0%} "
            "of what it moves with the class; its CFG numbers say nothing about CFG-conditioning"
        )
    if stale:
        print(f"  STALE: {stale}; --recompute-stale recomputes it")


def run_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_pipeline
    from tasks.config import load_config

    if args.plan:
        cfg = load_config(args.experiment, args.overrides)
        return print_plan(f"imf run -e {args.experiment}", {args.experiment: cfg}, args)

    result = run_pipeline(args.experiment, args.overrides)
    for stage in ("precompute", "train", "evaluate"):
        print(f"{stage}: {result.stages[stage]:<8} {getattr(result, stage).path.resolve()}")
    print_results(result.evaluate.results, result.evaluate.stale)
    print_where_to_look(result.config, result)
    return 0


def print_where_to_look(cfg, result) -> None:
    """The end of `imf run` and the demo: the MLflow runs, the UI commands, absolute paths."""
    from tasks.tracking import tracking_uri
    from tasks.tracking_client import client as tracking_client

    uri, ev = tracking_uri(cfg), result.evaluate
    best = next(r for r in ev.results if r["best"])
    grid = f"w{best['omega']:g}_t{best['t_min']:g}-{best['t_max']:g}.png"
    path = ev.path.resolve()
    train_run = result.train.mlflow_run_id
    print("\nwhere to look:")
    print(f"  MLflow runs     training {train_run}, evaluation {ev.mlflow_run_id}")
    web = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    if web != uri:
        print(f"  MLflow UI       mlflow ui --backend-store-uri {uri}, then")
    experiment = tracking_client(uri).get_run(train_run).info.experiment_id if train_run else ""
    # MLflow 3's UI opens in its GenAI mode unless the URL asks for the model-training view.
    print(
        f"  {'' if web != uri else 'MLflow UI':<15} {web.rstrip('/')}/#/experiments/"
        f"{experiment}/runs/{train_run}?workflowType=machine_learning"
    )
    print("  Prefect UI      prefect server start                    # http://127.0.0.1:4200")
    print(f"  FID vs omega    {path}/fid_vs_omega_t*.png")
    print(f"  sample grids    {path}/grids/ (best: {grid})")
    print(f"  results         {path}/results.json")
    during = sorted(result.train.path.resolve().glob("during/*/step*/results.json"))
    if during:  # tasks.inrun_eval: eval/fid over steps on the training run
        print(
            f"  FID in training {during[0].parent.parent}/step*/results.json ({len(during)} steps)"
        )


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
