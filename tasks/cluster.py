"""Where Ray work runs: a cluster named by address, or a local Ray started on demand."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

_lock = threading.Lock()  # sweeps start stages from several threads
_connected = False  # whether this process's connect_ray started (or joined) the Ray it uses
_address_before: str | None = None  # RAY_ADDRESS before connect_ray pinned its Ray's

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


# Dropped only in the processes of a local Ray (LOCAL_RAY set by start_local_ray): on a cluster
# they can mean something.
DROPPED_ON_ONE_MACHINE = {
    # Ray Train's controller registers its workers' resources with Ray Data's autoscaling
    # coordinator every 20 s and waits 5 s for the answer. One machine has no autoscaler to
    # tell; on a loaded one the wait runs out and it logs this with a traceback, Ray's own
    # text calling it "safe to ignore" when transient (seen in the quiet smoke sweep beside the
    # test suite's other scenarios, and with 4 busy processes beside it). On a cluster a
    # request that keeps failing leaves the autoscaler unaware of a training: it stays shown.
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": (
        "Failed to send resource request for"
    ),
}
LOCAL_RAY = "IMF_LOCAL_RAY"


def drop_known_messages() -> None:
    """Attaches each DROPPED filter once (in this process), and those of
    DROPPED_ON_ONE_MACHINE in the processes of a local Ray."""
    dropped = DROPPED | (DROPPED_ON_ONE_MACHINE if os.environ.get(LOCAL_RAY) == "1" else {})
    for name, text in dropped.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(DropMessage(text))


def quiet_worker_logs() -> None:
    """Ray worker setup hook: silences the known noise above, nothing else."""
    # Ray Train logs "Reporting training result N: TrainingReport(...)" at INFO on a logger
    # named by its file path (not under ray.train, so LoggingConfig does not reach it). The
    # path is spelled out rather than imported: the hook runs in every Ray worker process, and
    # importing ray.train there cost ~1 s of CPU per process.
    import ray

    context = Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution" / "context.py"
    logging.getLogger(str(context)).setLevel(logging.WARNING)
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


# The logins of the team's servers (docs/auth.md), read from the environment: every process
# that logs to MLflow or Prefect needs them (rank 0 of a training, evaluation actors).
CREDENTIALS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_AUTH_STRING",
)


def credentials() -> dict[str, str]:
    """The CREDENTIALS set in this process's environment."""
    return {k: os.environ[k] for k in CREDENTIALS if os.environ.get(k)}


def worker_setup(logins: dict[str, str]) -> Callable[[], None]:
    """The setup hook of every process of the command's Ray: the known noise silenced and
    `logins` put in its environment. Not as the runtime env's env_vars, which Ray's runtime
    env agent writes in plain text to its log on every node: a function hook is pickled into
    Ray's internal store, and its key is all that is logged. The nodes of a cluster started
    without the logins (`ray start` in a job script, a pod without the Secret) get them so."""

    def setup_worker() -> None:
        os.environ.update(logins)
        quiet_worker_logs()

    return setup_worker


def connect_ray(address: str, cpus_needed: float, gpus: int | None = None) -> None:
    """Joins the Ray cluster at `address` ("" = start a local one with at least `cpus_needed`
    CPUs, so fractional workers fit on a small machine, and `gpus` logical GPUs if given; the
    dashboard stays off, it would bind a port). An already initialised Ray is kept.

    Whichever it is, that Ray is the command's alone: its address goes to every process of it
    (this one, Ray's own, each worker and actor, Ray Train's controller and its placement-group
    cleaner, on every node) as RAY_ADDRESS, so nothing of ours looks up "the current cluster".
    Ray resolves a missing address from a machine-wide record of the last `ray start` (and by
    scanning for GCS processes): with another Ray on the machine, the cleaner of our training
    queried that one ("Found multiple active Ray instances"), and with a record naming a dead
    cluster it waited on it and printed a traceback (issue 33)."""
    global _connected, _address_before
    import ray

    with _lock:
        if ray.is_initialized():
            return
        drop_known_messages()
        quiet = {
            "worker_process_setup_hook": worker_setup(credentials()),
            # Ray Train's print patch sends a worker's print to its logger *and*, when stdout
            # is wrapped (as in Ray workers), to the original print: every line twice.
            "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
        }

        def pin(own: str) -> None:
            # The runtime env reaches every worker and actor; this process's own lookups (the
            # State API, Ray Train's driver side) and every process a local Ray starts from it
            # read its environment.
            quiet["env_vars"]["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"] = own

        _address_before = os.environ.get("RAY_ADDRESS")
        _connected = True
        try:
            if address:
                pin(resolved_address(address))
                # As given: for "auto" Ray reads the address pinned above, and, as for "auto"
                # only, turns on token authentication when the node has a token.
                ray.init(address=address, runtime_env=quiet)
            else:
                # The port is free when chosen, but another process (another command's Ray
                # starting beside this one) can take it before the GCS binds it: then another.
                for attempt in range(1, LOCAL_PORT_ATTEMPTS + 1):
                    own = f"127.0.0.1:{free_port()}"
                    pin(own)
                    try:
                        start_local_ray(own, cpus_needed, gpus, quiet)
                        break
                    except PortTaken:
                        if attempt == LOCAL_PORT_ATTEMPTS:
                            raise
        except BaseException:
            forget_address()
            raise
        from tasks import preemption

        preemption.reinstall()  # ray.init replaced the SIGTERM handler with its own


def connected() -> bool:
    """Whether connect_ray has connected this process to a Ray that is not shut down yet."""
    return _connected


LOCAL_PORT_ATTEMPTS = 5


class PortTaken(RuntimeError):
    """The port chosen for a local Ray's GCS was taken before the GCS could bind it."""


def port_taken(err: RuntimeError, port: str) -> bool:
    """Whether ray.init failed because its GCS could not bind `port` (Ray's message)."""
    return "Failed to start GCS" in str(err) and f"The specified port is {port}." in str(err)


def start_local_ray(address: str, cpus_needed: float, gpus: int | None, runtime_env: dict):
    """A new local Ray whose GCS listens at `address` ("local": never join one another process
    started here), chosen before it starts so that its processes know it from the start."""
    import ray

    # It enables token authentication by default and says so on every start, a line per
    # command that asks nothing of the user: that logger stays quiet for it.
    logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    # Ray Train's preemption watcher polls for nodes being drained (spot instances on a
    # cluster); one local machine is never drained, and creating the watcher logs a C++ error
    # line ("PreemptionWatcher ... constructor arguments in the object store") per training.
    # On a cluster (connect_ray's `address`) it stays on.
    preemption = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = preemption
    runtime_env["env_vars"][LOCAL_RAY] = "1"  # what its processes drop (DROPPED_ON_ONE_MACHINE)
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
    # default; read from this process's environment when a training starts), and a training's
    # start and end each wait on a few polls. On one machine a poll is cheap: at 0.5 s four
    # trainings of an empty loop took 50 s instead of 62 (measured here, 2026-12-06).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
    port = address.rsplit(":", 1)[1]
    with environment(RAY_GCS_SERVER_PORT=port):
        try:
            ray.init(
                address="local",
                include_dashboard=False,
                num_cpus=cpus,
                num_gpus=gpus,
                runtime_env=runtime_env,
            )
        except RuntimeError as err:
            if not port_taken(err, port):
                raise
            ray.shutdown()
            raise PortTaken(f"the port {port} chosen for a local Ray was taken") from err
    started = ray.get_runtime_context().gcs_address
    if started.rsplit(":", 1)[1] != port:  # a Ray that no longer honours the setting
        ray.shutdown()
        raise RuntimeError(f"the local Ray started at {started}, not at {address}")


def forget_address() -> None:
    """RAY_ADDRESS back to what it was before connect_ray pinned its Ray's; this process is
    no longer connected (connected() is False)."""
    global _connected
    _connected = False
    if _address_before is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = _address_before


def resolved_address(address: str) -> str:
    """A cluster address as host:port. "auto" (on a Ray node: its own cluster) is resolved
    once, here, by Ray's rule (RAY_ADDRESS, else the node's record of its `ray start`), and
    the result pinned; any other value is taken as given."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die("auto")


@contextmanager
def environment(**values: str):
    """Sets environment variables for the duration of a `with` (processes started inside
    inherit them), then puts back what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    import sys

    if "ray" not in sys.modules:
        return
    import ray

    from tasks.preemption import descendants, kill_all

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
    forget_address()
    kill_all(started)
