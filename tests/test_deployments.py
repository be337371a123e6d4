"""A Prefect deployment runs the same checks as the command line before any work: each of
infra/prefect.yaml's deployments, its flow called with its own parameters, passes them with
its files in place (the cluster's shared volume stubbed by a folder here) and is refused, with
the CLI's message, when one is missing."""

from pathlib import Path

import pytest
import yaml
from paper_inputs import MAKERS, scale_expectations
from prefect.flows import load_flow_from_entrypoint

DEPLOYMENTS = Path(__file__).resolve().parent.parent / "infra" / "prefect.yaml"


class Started(Exception):
    """The first step of real work was reached: every check before it passed."""


class FirstWork:
    """Stands in for the flow's first step of work (a function or a Prefect task)."""

    def __call__(self, *args, **kwargs):
        raise Started

    def with_options(self, **options):
        return self


start = FirstWork()


# Where each flow's work starts, once its checks are done.
FIRST_WORK = {
    "imf-pipeline": "flows.pipeline.run_stages",
    "imf-precompute": "flows.pipeline.precompute_task",
    "imf-sweep": "flows.sweep.parent_run",
}


def deployments() -> list[dict]:
    return yaml.safe_load(DEPLOYMENTS.read_text())["deployments"]


def on_stub_volume(parameters: dict, volume: Path) -> dict:
    """The deployment's parameters with the shared volume (/artifacts) moved to `volume`, where
    every file they name exists as a stand-in that passes tasks.inputs' checks (paper_inputs;
    cluster_env scales the expectations to them)."""
    moved = {}
    for key, value in parameters.items():
        if isinstance(value, list):
            value = [v.replace("=/artifacts", f"={volume}") for v in value]
        elif value == "/artifacts":
            value = str(volume)
        moved[key] = value
    for item in moved.get("overrides", []):
        key, _, path = item.partition("=")
        if not path.startswith(str(volume)) or key == "paths.artifacts":
            continue
        if not Path(path).exists():
            MAKERS[key](Path(path))
    return moved


@pytest.fixture
def cluster_env(tmp_path, monkeypatch):
    """A tracking store of its own, and no Ray cluster to reach (work never starts)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr("tasks.provenance.code_state", lambda repo=None: clean_code())
    scale_expectations(monkeypatch)
    return tmp_path


def clean_code():
    from tasks.provenance import CodeState

    return CodeState("c" * 40, (), "")


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_each_deployment_passes_the_checks_with_its_files_in_place(
    deployment, cluster_env, monkeypatch
):
    flow = load_flow_from_entrypoint(deployment["entrypoint"])  # a module path: installed code
    parameters = on_stub_volume(deployment.get("parameters", {}), cluster_env / "volume")
    if flow.name == "imf-report":  # nothing to check before a sweep ran: the CLI's refusal
        with pytest.raises(LookupError, match="no MLflow run of sweep 'table1b' at scale 'paper'"):
            flow.fn(**parameters)
        return
    monkeypatch.setattr(FIRST_WORK[flow.name], start)
    with pytest.raises(Started):
        flow.fn(**parameters)


@pytest.mark.parametrize(
    "missing, message",
    [
        ("eval.inception_weights", "never downloaded"),
        ("eval.reference", "is not a file"),
        ("tokenizer.path", "has no config.json"),
    ],
)
def test_the_nightly_sweep_is_refused_as_the_cli_refuses_it(
    missing, message, cluster_env, monkeypatch, capsys
):
    from flows import cli

    (nightly,) = [d for d in deployments() if d.get("schedules")]
    parameters = on_stub_volume(nightly["parameters"], cluster_env / "volume")
    path = next(o.partition("=")[2] for o in parameters["overrides"] if o.startswith(missing))
    if missing == "tokenizer.path":
        Path(path, "config.json").unlink()
    else:
        Path(path).unlink()
    flow = load_flow_from_entrypoint(nightly["entrypoint"])
    monkeypatch.setattr("flows.sweep.parent_run", start)
    with pytest.raises((FileNotFoundError, ValueError)) as refused:
        flow.fn(**parameters)
    assert message in str(refused.value)
    argv = ["sweep", parameters["name"], "--scale", parameters["scale"], *parameters["overrides"]]
    assert cli.main(argv) == 2
    assert str(refused.value) in capsys.readouterr().err  # the same words, from the CLI


def test_a_dirty_or_unknown_tree_is_refused_at_paper_scale_by_the_flow_too(
    cluster_env, monkeypatch
):
    from tasks.provenance import CodeState

    (nightly,) = [d for d in deployments() if d.get("schedules")]
    parameters = on_stub_volume(nightly["parameters"], cluster_env / "volume")
    flow = load_flow_from_entrypoint(nightly["entrypoint"])
    monkeypatch.setattr("flows.sweep.parent_run", start)
    dirty = CodeState("c" * 40, ("tasks/train.py",), "f00")
    monkeypatch.setattr("tasks.provenance.code_state", lambda repo=None: dirty)
    with pytest.raises(ValueError, match=r"not committed \(tasks/train.py\)"):
        flow.fn(**parameters)
    with pytest.raises(Started):
        flow.fn(**parameters, allow_dirty=True)


def test_the_precompute_deployment_checks_its_images_first(cluster_env, monkeypatch):
    (deployment,) = [d for d in deployments() if d["name"] == "precompute"]
    parameters = on_stub_volume(deployment["parameters"], cluster_env / "volume")
    root = next(o.partition("=")[2] for o in parameters["overrides"] if o.startswith("data.root"))
    (Path(root) / "n00000000" / "img0.JPEG").unlink()  # an incomplete copy
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    monkeypatch.setattr(FIRST_WORK[flow.name], start)
    with pytest.raises(ValueError, match=r"5 images, imagenet1k has 6: .*\(set data.root\)"):
        flow.fn(**parameters)
