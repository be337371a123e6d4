"""Where Ray work runs: a cluster named by address, or a local Ray started on demand."""

from __future__ import annotations

import logging
import math
import os
import threading

_lock = threading.Lock()  # sweeps start stages from several threads
_connected = False  # whether this process's connect_ray started (or joined) the Ray it uses

# Ray merges "similar" lines of different workers into one ("[repeated 6x across cluster]"):
# with `--concurrency` above 1 that hid whole trainings' progress lines. Read when ray is
# first imported, which happens below, after this module.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's native crash handler takes SIGTERM in the driver process, process-wide, even when
# ray.init runs in a thread that is not the main one: it logged "*** SIGTERM received ***" and
# aborted the process at once, so a preempted command left its trainings' work, Ray's
# processes and Prefect's server behind. The command handles SIGTERM (tasks.preemption).
# Also read when ray is first imported.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

# Ray Train V2's placement-group cleaner polls the State API, which needs the dashboard we keep
# off (it would bind a port), and warns every few seconds that the query failed: a third of a
# demo's output. Without that query it never learns that a controller died, so it cannot do
# its job here (freeing a dead controller's placement group) with or without the warnings; the
# command's local Ray, placement groups included, ends with the command.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class DropMessage(logging.Filter):
    """Drops one known message of one logger, nothing else. A filter, not a level: Ray Train
    configures its controller's loggers with dictConfig after our setup hook, which resets the
    level of every logger under `ray.train` but keeps their filters."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


DROPPED = {
    # The cleaner's monitor thread can sit in a State API query for up to 10 s (see above); on a
    # loaded machine the controller's 12 s wait to stop it then runs out and it logs this, with
    # a traceback, after a training that succeeded.
    "ray.train.v2._internal.callbacks.placement_group_callback": (
        "Failed to stop PlacementGroupCleaner gracefully"
    ),
    # ray.init from a Prefect task's thread warns on every command that it cannot install its
    # SIGTERM handler there; the command's own handling of SIGTERM is unchanged by it.
    "ray._private.worker": "SIGTERM handler is not set",
    # torch.compile (train.compile_jvp, the demo) on a machine with a CUDA toolkit but no GPU
    # warns once per worker that it found the toolkit without a runtime: nothing to act on.
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}


def drop_known_messages() -> None:
    """Attaches each DROPPED filter once (in this process)."""
    for name, text in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(DropMessage(text))


def quiet_worker_logs() -> None:
    """Ray worker setup hook: silences the known noise above, nothing else."""
    # Ray Train logs "Reporting training result N: TrainingReport(...)" at INFO on a logger
    # named by its file path (not under ray.train, so LoggingConfig does not reach it).
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    drop_known_messages()
    quiet_known_warnings()


def quiet_known_warnings() -> None:
    """torch's own forward-AD decompositions still call torch.jit.script, which warns that it
    is deprecated on every first JVP; MLflow's log_table trips a pandas 3 deprecation. Neither
    is ours to fix, nor a user's concern."""
    import warnings

    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")


def connect_ray(address: str, cpus_needed: float) -> None:
    """Joins the Ray cluster at `address` ("" = start a local one with at least `cpus_needed`
    CPUs, so fractional workers fit on a small machine; the dashboard stays off, it would bind
    a port). An already initialised Ray is kept."""
    global _connected
    import ray

    with _lock:
        if ray.is_initialized():
            return
        drop_known_messages()
        quiet = {
            "worker_process_setup_hook": "tasks.cluster.quiet_worker_logs",
            # Ray Train's print patch sends a worker's print to its logger *and*, when stdout
            # is wrapped (as in Ray workers), to the original print: every line twice.
            "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
        }
        _connected = True
        if address:
            ray.init(address=address, runtime_env=quiet)
        else:  # a new local Ray ("local": never join one another process started here)
            # It enables token authentication by default and says so on every start, a line
            # per command that asks nothing of the user: that logger stays quiet for it.
            logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
            # Ray Train's preemption watcher polls for nodes being drained (spot instances on
            # a cluster); one local machine is never drained, and creating the watcher logs a
            # C++ error line ("PreemptionWatcher ... constructor arguments in the object
            # store") per training. On a cluster (`address` above) it stays on.
            preemption = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            quiet["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = preemption
            cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
            ray.init(address="local", include_dashboard=False, num_cpus=cpus, runtime_env=quiet)
        from tasks import preemption

        preemption.reinstall()  # ray.init replaced the SIGTERM handler with its own


def require_resources(stage: str, cpus: float, gpus: float) -> None:
    """Fails at once, naming the setting, when no node of the connected Ray could ever run a
    `stage` worker (it would wait forever): GPUs asked for on a cluster without them."""
    import ray

    total = ray.cluster_resources()
    if gpus > 0 and total.get("GPU", 0) < gpus:
        raise ValueError(
            f"{stage}.gpus_per_worker={gpus:g}, but the Ray cluster has "
            f"{total.get('GPU', 0):g} GPUs: set it to 0 on a machine without GPUs"
        )
    if total.get("CPU", 0) < cpus:
        have = total.get("CPU", 0)
        raise ValueError(f"{stage}.cpus_per_worker={cpus:g}, but the Ray cluster has {have:g} CPUs")


def shutdown_ray() -> None:
    """Ends the Ray connect_ray started, and what of it ray.shutdown leaves: a local Ray's
    DashboardAgent and RuntimeEnvAgent outlived it (seen after sweeps), so every process of
    Ray's this one started and that is still alive after it is killed."""
    import signal
    import sys

    if "ray" not in sys.modules:
        return
    import ray

    from tasks.preemption import descendants

    if not (_connected and ray.is_initialized()):  # a Ray someone else started is theirs
        return
    started = []
    for pid in descendants(os.getpid()):
        try:
            if b"ray" in open(f"/proc/{pid}/cmdline", "rb").read():
                started.append(pid)
        except OSError:
            pass
    ray.shutdown()
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
