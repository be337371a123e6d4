"""A real SLURM for the tests: munged, slurmctld and a slurmd per node (Debian's slurm-wlm), the
nodes all this machine, as children of the test, with their key, configuration, state and
logs in a folder of their own.

    >>> with slurm_cluster(tmp) as cluster:
    ...     job = cluster.sbatch("infra/slurm/imf.sbatch", "run", "-e", "smoke")
    ...     cluster.wait(job, "COMPLETED")

Needs root (slurmd starts jobs as their user) and `apt-get install slurm-wlm munge` (.ci/run).
No cgroups in a container: processes are tracked by their parent (proctrack/linuxproc).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from services import stop

from tasks.cluster import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def available() -> str | None:
    """Why a SLURM cannot run here (None when it can)."""
    missing = [d for d in (*DAEMONS, "sbatch") if shutil.which(d, path=SBIN_PATH) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

CONF = """\
ClusterName=imftest
# Job ids of this cluster's own: a job's files named by its id (/tmp/imf-ray-<id>) stay apart
# from another test run's
FirstJobId={first_job_id}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (+1 s) before it may start again (120 s by default)
AuthInfo=socket={root}/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# a job that became eligible (a requeued one, after cred_expire) starts within 2 s, not 60
SchedulerParameters=sched_interval=2
JobRequeue=1
KillWait=5
MinJobAge=3600
ReturnToService=2
MpiDefault=none
{nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    env: dict  # SLURM_CONF: what the client commands (sbatch, scontrol, scancel) read

    def command(self, *args: str) -> str:
        out = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submits a batch job (its environment: this process's, with `env`); its id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env=self.env | (env or {}),
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, ExitCode, Restarts, StdOut, ...)."""
        text = self.command("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\S+?)=(\S*)", text))

    def wait(self, job_id: str, *states: str, timeout: float = 600) -> dict[str, str]:
        """Waits until the job is in one of `states`; its fields then."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not {'/'.join(states)} in {timeout} s: {job}")
            time.sleep(0.5)
        return job


def daemon(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_for(check, what: str, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM: not {what} after {timeout} s")
        time.sleep(0.2)


@contextmanager
def slurm_cluster(root: Path, nodes: int = 2) -> Iterator[Cluster]:
    """munged, slurmctld and `nodes` slurmd, their files under `root` (kept short: munge's
    socket path must fit in 108 bytes); stopped at the end, with any job still running.
    The nodes (imf1, imf2, ...) are this machine, each with its CPUs, one slurmd each on a
    port of its own: a job's `srun` steps reach "other nodes" as on a cluster."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"imf{i}" for i in range(1, nodes + 1)]
    for sub in ("state", *(f"spool-{name}" for name in names)):
        (root / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    node_lines = "".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
        f"CPUs={os.cpu_count()} State=UNKNOWN\n"
        for name in names
    )
    conf = root / "slurm.conf"
    conf.write_text(
        CONF.format(
            host=host,
            root=root,
            nodes=node_lines,
            ctld_port=free_port(),
            first_job_id=10_000 + os.getpid() % 1_000_000 * 100,
        )
    )
    env = os.environ | {"SLURM_CONF": str(conf), "PATH": SBIN_PATH}
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket_path = root / "munge.socket"
    procs: list[subprocess.Popen] = []
    with ExitStack() as stack:
        stack.callback(stop_all, procs)
        procs.append(
            daemon(
                # --force: munged refuses to run as root, or with its files in a folder others
                # can write (a temporary one)
                ["munged", "--foreground", "--force", f"--key-file={key}"]
                + [f"--socket={socket_path}", f"--pid-file={root}/munged.pid"]
                + [f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
                root / "munged.out",
                env,
            )
        )
        wait_for(socket_path.exists, "munged listening", procs)
        procs.append(daemon(["slurmctld", "-D", "-c", "-i"], root / "slurmctld.out", env))
        cluster = Cluster(root, env)
        wait_for(lambda: ping(cluster), "slurmctld answering", procs)
        for name in names:
            procs.append(daemon(["slurmd", "-D", "-N", name], root / f"slurmd-{name}.out", env))
        wait_for(lambda: idle(cluster) == nodes, "the nodes idle", procs)
        yield cluster
        for line in cluster.command("squeue", "--noheader", "--format=%i").split():
            cluster.command("scancel", "--signal=KILL", line)


def ping(cluster: Cluster) -> bool:
    try:
        return "UP" in cluster.command("scontrol", "ping")
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def idle(cluster: Cluster) -> int:
    """How many nodes are idle."""
    try:
        out = cluster.command("sinfo", "--noheader", "--format=%T %D")
    except (RuntimeError, subprocess.TimeoutExpired):
        return 0
    return sum(
        int(n) for state, n in (line.split() for line in out.splitlines()) if state == "idle"
    )


def stop_all(procs: list[subprocess.Popen]) -> None:
    """slurmd, slurmctld, munged in turn: SIGTERM, SIGKILL after 10 s."""
    for proc in reversed(procs):
        stop(proc, grace=10)
