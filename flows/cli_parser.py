"""The `imf` command line's grammar: its commands, their options and help (flows.cli runs them).

    >>> build_parser().parse_args(["run", "-e", "demo", "train.steps=500"])
    >>> with team_configs(argv): ...  # --config-dir DIR over the shipped configs, read first

The help lists the experiments and sweeps (with their scales) there are, the team's included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
