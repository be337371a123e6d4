"""The package as the image installs it: a wheel built from this checkout, installed (not
editable) into a fresh environment, run from an empty directory outside the checkout. The
configs and the GPU checks ship inside it, `imf --version` names the commit it was built from,
and a team's own experiment is found through --config-dir."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.provenance import REPO, code_state

pytestmark = pytest.mark.slow

TEAM_EXPERIMENT = """\
# A team's experiment, kept outside the package: a shorter smoke run.
defaults: {data: digits}
model: {name: tiny}
train: {steps: 20}
"""


def install_wheel(directory: Path) -> Path:
    """Builds the checkout's wheel and installs it, without its dependencies, into a new
    environment that borrows the project environment's packages (no network): the wheel's own
    modules come first on that environment's path. Returns the environment's bin folder."""
    wheels = directory / "wheels"
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools would add what it left there
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, cwd=REPO)
    shutil.rmtree(REPO / "build", ignore_errors=True)
    env = directory / "env"
    subprocess.run(
        [Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", "--without-pip", env],
        check=True,
    )
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A path line in a .pth file: the project environment's packages, after the wheel's own.
    (Path(purelib) / "imf-project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = wheels.glob("imf_pipeline-*.whl")
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    return env / "bin"


def installed_package(directory: Path) -> SimpleNamespace:
    """Background scenario: every command a user of the image runs first."""
    built_from = code_state(REPO)
    bin_ = install_wheel(directory)
    work = directory / "empty"
    team = directory / "team-configs"
    work.mkdir()
    (team / "experiment").mkdir(parents=True)
    (team / "experiment" / "team_smoke.yaml").write_text(TEAM_EXPERIMENT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IMF_CONFIG_DIR")}
    env |= {"PREFECT_HOME": str(directory / "prefect"), "MLFLOW_TRACKING_URI": ""}

    def imf(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bin_ / "imf"), *args],
            cwd=work,
            env=env | (extra_env or {}),
            capture_output=True,
            text=True,
            timeout=900,
        )

    seen = SimpleNamespace(bin=bin_, work=work, built_from=built_from)
    seen.where = subprocess.run(
        [str(bin_ / "python"), "-c", "import configs, tasks; print(tasks.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    seen.version = imf("--version")
    short = ["train.steps=30", "train.checkpoint_every=30", "eval.n_samples=200"]
    short += ["eval.shard_size=100", "eval.batch_size=100"]  # the smoke run, shortened
    seen.runs = [imf("run", "-e", "smoke", *short) for _ in range(2)]
    seen.sweep_plan = imf("sweep", "table1a", "--scale", "paper", "--plan")
    seen.team_plan = imf("run", "--config-dir", str(team), "-e", "team_smoke", "--plan")
    seen.team_env = imf("run", "-e", "team_smok", "--plan", extra_env={"IMF_CONFIG_DIR": str(team)})
    return seen


@pytest.mark.background(scenario=installed_package)
def test_the_wheel_runs_its_own_code_from_an_empty_directory(background):
    installed = background
    assert installed.where.startswith(str(installed.bin.parent)), installed.where
    state = installed.built_from
    version = installed.version.stdout
    assert version.startswith("imf-pipeline 0.1.0 (commit " + state.commit[:12]), version
    assert "from the build record" in version
    assert ("clean" in version) == (not state.dirty)


@pytest.mark.background(scenario=installed_package)
def test_the_smoke_pipeline_is_computed_then_reused(background):
    installed = background
    first, second = installed.runs
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("precompute", "train", "evaluate"):
        assert f"{stage}: computed" in first.stdout
        assert f"{stage}: " in second.stdout and f"{stage}: computed" not in second.stdout
    work = installed.work
    assert (work / "mlflow.db").is_file() and (work / "artifacts" / "train").is_dir()
    from tasks.tracking_client import client

    runs_of = client(f"sqlite:///{work / 'mlflow.db'}")
    runs = runs_of.search_runs([e.experiment_id for e in runs_of.search_experiments()])
    assert runs, "no MLflow run recorded"
    for run in runs:  # the code of the run is the build's, and says so
        assert run.data.tags["imf.code_source"] == "build record"
        assert run.data.tags["mlflow.source.git.commit"] == installed.built_from.commit


@pytest.mark.background(scenario=installed_package)
def test_the_paper_plan_costs_from_the_shipped_gpu_checks(background):
    installed = background
    plan = installed.sweep_plan
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "nothing started" in plan.stdout
    assert "6 trainings, 6 evaluations" in plan.stdout
    assert "the H200 SXM datasheet dense bf16 peak" in plan.stdout  # MFU's denominator
    assert "MFU = useful FLOPs / that peak (2026-12-04-h200-run" in plan.stdout  # a shipped check


@pytest.mark.background(scenario=installed_package)
def test_a_team_experiment_is_found_through_config_dir_and_the_environment(background):
    installed = background
    plan = installed.team_plan
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "plan: imf run -e team_smoke" in plan.stdout and "20 steps" in plan.stdout
    typo = installed.team_env  # IMF_CONFIG_DIR: the same lookup, the same listing
    assert typo.returncode == 2
    assert "did you mean 'team_smoke'? known: demo, imagenet_b2, smoke, team_smoke" in typo.stderr


def test_the_image_installs_every_shipped_package_and_runs_as_its_user():
    """infra/Dockerfile, read as docker would (no docker daemon here): what the wheel holds is
    copied in, the user owns the working directory, and no ENTRYPOINT turns the command that
    `ray up` or KubeRay appends into `imf <command>`."""
    import tomllib

    lines = (REPO / "infra" / "Dockerfile").read_text().splitlines()
    steps = [line.split(None, 1) for line in lines if line and not line.startswith(("#", " "))]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in pyproject["packages"]["find"]["include"]}
    copied = {word for step, args in steps if step == "COPY" for word in args.split()[:-1]}
    assert packages | {"setup.py", "pyproject.toml", "requirements.lock"} <= copied
    assert "ENTRYPOINT" not in {step for step, _ in steps}
    user = next(args for step, args in steps if step == "USER")
    workdir = next(args for step, args in steps if step == "WORKDIR")
    assert user != "root" and f"chown {user}:{user} {workdir}" in "\n".join(lines)
    assert any("IMF_BUILD_COMMIT" in args for step, args in steps if step == "ARG")
