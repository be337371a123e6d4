"""The whole pipeline for one experiment: precompute -> train -> evaluate, as one Prefect flow.

    imf run -e smoke [key=value ...]
    >>> result = pipeline("smoke", ["train.steps=100"])

Each stage is a Prefect task cached by its content key while its `_SUCCESS` manifest stands
(tasks.artifacts.cache_key_of), so a rerun of a failed flow recomputes only what is missing:
a finished stage is a cache hit, an interrupted one resumes from its shards, checkpoints or
units. Retries are for transient failures (I/O, a lost Ray worker), never for a deterministic
one (a config error, a missing file, a non-finite loss): those fail at once with their message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, tags
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import State

from flows.gpu_memory import check_gpu_memory
from tasks import preemption
from tasks.config import ConfigError, load_config
from tasks.eval_inputs import preflight
from tasks.evaluate import EvalJob, EvalResult, evaluate_task
from tasks.inputs import reads_of, require_inputs
from tasks.precompute import PrecomputeJob, PrecomputeResult, precompute_task
from tasks.schema import ExperimentConfig
from tasks.storage import Store
from tasks.train import TrainJob, TrainResult, train_task

# Failures that the same inputs would only repeat: no retry.
DETERMINISTIC = (ConfigError, ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError)


def transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry unless the failure is deterministic."""
    try:
        state.result()
    except DETERMINISTIC:
        return False
    except Exception:
        return True
    return False


RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": transient}


def results_beside(artifacts: str):
    """Prefect's persisted task results go beside the artifact root (not ~/.prefect): deleting
    the root forgets both the outputs and the cache entries that point at them (on object
    storage, a node-local folder named after it: a cache miss there only reruns a stage
    body, which finds its output's manifest). Enter it around the flow call (a flow fixes
    its result store when it starts)."""
    path = Store.of(artifacts).scratch("prefect-results")
    return temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: path})


def start_ray(configs: list) -> None:
    """The command's Ray, started here, in the main thread, before the flow's task threads: Ray
    ties its processes' lives to the thread that starts them (PR_SET_PDEATHSIG), so a Ray
    started in a task's thread died with that thread -- its agents left running for good after
    every sweep -- and its SIGTERM handling is the main thread's (tasks.preemption)."""
    from tasks.cluster import connect_ray

    need = max(c.train.num_workers * c.train.cpus_per_worker for c in configs)
    connect_ray(configs[0].train.ray_address, need)


def check_prefect(timeout: float = 5.0) -> None:
    """The Prefect server PREFECT_API_URL names answers and takes PREFECT_API_AUTH_STRING (one
    started with PREFECT_SERVER_API_AUTH_STRING answers 401 to any other): checked before any
    work, as tasks.tracking checks MLflow. Without PREFECT_API_URL a command starts
    a temporary server of its own: nothing to check."""
    import base64
    import urllib.error
    import urllib.request

    from prefect.settings import get_current_settings

    api = get_current_settings().api
    if not api.url:
        return
    secret = api.auth_string.get_secret_value() if api.auth_string else ""
    # The header Prefect's own client sends (prefect.client.orchestration)
    headers = {"Authorization": f"Basic {base64.b64encode(secret.encode()).decode()}"}
    request = urllib.request.Request(
        f"{api.url.rstrip('/')}/admin/version", headers=headers if secret else {}
    )
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            raise
        given = "a wrong auth string" if secret else "no auth string set"
        raise PermissionError(
            f"Prefect at {api.url} refused the credentials (HTTP {err.code}, {given}): "
            "set PREFECT_API_AUTH_STRING to the server's user:password"
        ) from None
    except OSError as err:
        raise ConnectionError(
            f"the Prefect server at {api.url} does not answer "
            f"({getattr(err, 'reason', err)}); start it, or unset PREFECT_API_URL"
        ) from None


def checked_config(experiment: str, overrides: list[str] | None = None):
    """The experiment's config, checked before any work: its keys and values, every file and
    server the stages will need, and a GPU training's per-GPU batch. The flow runs it first,
    so that `imf run`, a deployment and a Python call are refused alike; `imf run` runs it once
    more before a Prefect server starts, to fail in a second instead of after one."""
    cfg = load_config(experiment, overrides or [])
    if cfg.eval.checkpoint:
        raise ConfigError("eval.checkpoint evaluates given weights without training: imf evaluate")
    check_gpu_memory([cfg])  # a per-GPU batch over what fit on the GPU check: train.micro_batch
    preflight(cfg)
    return cfg


def run_pipeline(experiment: str, overrides: list[str] | None = None) -> PipelineResult:
    """`imf run`: composes and checks the config once (before a Prefect server starts), then
    runs the flow on that object; the result carries it, for the closing printout."""
    cfg = checked_config(experiment, overrides)
    check_prefect()
    start_ray([cfg])
    with results_beside(cfg.paths.artifacts), tags("imf", f"experiment:{experiment}"):
        return pipeline(experiment, overrides or [], composed=cfg)


@dataclass
class PipelineResult:
    experiment: str
    precompute: PrecomputeResult
    train: TrainResult
    evaluate: EvalResult
    stages: dict[str, str]  # stage -> "computed" | "reused" | "cached" (a Prefect cache hit)
    config: ExperimentConfig  # what ran, composed once


def stage_outcome(state: State) -> str:
    return {"Cached": "cached", "Reused": "reused"}.get(state.name, "computed")


def stage_names(cfg) -> dict[str, dict[str, str]]:
    """Task-run names that say what each stage works on (Prefect's default is `train-c8f`)."""
    label = (cfg.tracking.run_name or cfg.name).replace("{", "(").replace("}", ")")
    return {
        "precompute": {"task_run_name": f"precompute {cfg.data.name}"},
        "train": {"task_run_name": f"train {label}"},
        "evaluate": {"task_run_name": f"evaluate {label}"},
    }


@flow(name="imf-pipeline", flow_run_name="run {experiment}", log_prints=True)
def pipeline(
    experiment: str = "smoke",
    overrides: list[str] | None = None,
    composed: ExperimentConfig | None = None,
) -> PipelineResult:
    """Precompute, train and evaluate one experiment config (configs/experiment/<name>.yaml):
    `composed`, already checked (run_pipeline), else composed and checked here (a
    deployment's run)."""
    preemption.reinstall()  # over Prefect's SIGTERM handler (tasks.preemption says why)
    return run_stages(composed if composed is not None else checked_config(experiment, overrides))


@flow(name="imf-precompute", log_prints=True)
def precompute_flow(experiment: str = "smoke", overrides: list[str] | None = None) -> str:
    """Stage 1 alone (a CPU work pool's deployment); returns the output directory. Its inputs
    (the images, the VAE) are checked first, as `imf precompute` checks them."""
    cfg = load_config(experiment, overrides or [])
    require_inputs(cfg, reads_of(cfg, ["precompute"]))
    job = PrecomputeJob.of(cfg)
    return precompute_task.with_options(**RETRIES)(job, return_state=True).result().out.uri


def run_stages(cfg) -> PipelineResult:
    """The three stage tasks of one config, in order; each raises if its stage failed."""
    states, names = {}, stage_names(cfg)
    states["precompute"] = precompute_task.with_options(**RETRIES, **names["precompute"])(
        PrecomputeJob.of(cfg), return_state=True
    )
    pre = states["precompute"].result()
    train_named = train_task.with_options(**RETRIES, **names["train"])
    states["train"] = train_named(TrainJob.of(cfg, pre), return_state=True)
    trained = states["train"].result()
    evaluate_named = evaluate_task.with_options(**RETRIES, **names["evaluate"])
    states["evaluate"] = evaluate_named(EvalJob.of(cfg, pre), trained, return_state=True)
    evaluated = states["evaluate"].result()
    stages = {name: stage_outcome(state) for name, state in states.items()}
    for name, outcome in stages.items():
        print(f"{name}: {outcome}")
    return PipelineResult(cfg.name, pre, trained, evaluated, stages, cfg)
