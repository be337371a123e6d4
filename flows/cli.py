"""The `imf` command line (its contract is in DESIGN.md).

imf precompute [-e EXPERIMENT] [key=value ...]
imf train      [-e EXPERIMENT] [key=value ...]
imf evaluate   [-e EXPERIMENT] [key=value ...]
imf run        [-e EXPERIMENT] [key=value ...]
imf sweep SWEEP [--scale smoke|paper] [key=value ...]
imf report SWEEP_OR_RUN
"""

from __future__ import annotations

import argparse
import sys

# What each command does; those not built yet say so and fail, printing nothing like a result.
NOT_BUILT = {
    "precompute": "latent precomputation to Parquet",
    "train": "distributed training on Ray Train",
    "evaluate": "sharded FID/IS evaluation",
    "run": "the whole pipeline flow",
    "sweep": "ablation sweeps",
    "report": "paper-style reports",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imf", description="Improved MeanFlow experiment pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("precompute", "train", "evaluate", "run"):
        sub = commands.add_parser(name, help=NOT_BUILT[name])
        sub.add_argument("-e", "--experiment", default="smoke")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
    sweep = commands.add_parser("sweep", help=NOT_BUILT["sweep"])
    sweep.add_argument("sweep")
    sweep.add_argument("--scale", choices=("smoke", "paper"), default="smoke")
    sweep.add_argument("overrides", nargs="*", metavar="key=value")
    report = commands.add_parser("report", help=NOT_BUILT["report"])
    report.add_argument("target", metavar="SWEEP_OR_RUN")
    return parser


def run_precompute(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.precompute import precompute

    cfg = load_config(args.experiment, args.overrides)
    result = precompute(cfg.data, cfg.tokenizer, cfg.precompute, cfg.paths.artifacts)
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


def run_train(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.precompute import precompute
    from tasks.train import train

    cfg = load_config(args.experiment, args.overrides)
    pre = precompute(cfg.data, cfg.tokenizer, cfg.precompute, cfg.paths.artifacts)
    print(f"precompute: {'computed' if pre.computed else 'reused'} {pre.path}")
    result = train(cfg, pre)
    state = "trained" if result.computed else "reused"
    print(f"train: {state}, {result.steps} steps, MLflow run {result.mlflow_run_id}")
    print(result.path)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.evaluate import evaluate
    from tasks.precompute import precompute
    from tasks.train import train

    cfg = load_config(args.experiment, args.overrides)
    pre = precompute(cfg.data, cfg.tokenizer, cfg.precompute, cfg.paths.artifacts)
    print(f"precompute: {'computed' if pre.computed else 'reused'} {pre.path}")
    trained = train(cfg, pre)
    print(f"train: {'trained' if trained.computed else 'reused'} {trained.path}")
    result = evaluate(cfg, pre, trained)
    state = f"computed {result.units_computed} unit(s)" if result.computed else "reused"
    print(f"evaluate: {state}")
    for r in result.results:
        extra = f"  accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        star = "  <- best" if r["best"] else ""
        point = f"omega {r['omega']:<5g} [{r['t_min']:g}, {r['t_max']:g}]"
        print(f"  {point}  FID {r['fid']:8.3f}  IS {r['is']:6.3f}{extra}{star}")
    print(result.path)
    return 0


COMMANDS = {"precompute": run_precompute, "train": run_train, "evaluate": run_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in COMMANDS:
        print(f"imf {args.command}: {NOT_BUILT[args.command]} is not built yet.", file=sys.stderr)
        return 2
    from tasks.config import ConfigError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as err:
        print(f"imf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
