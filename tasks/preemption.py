"""Stopping on a scheduler's SIGTERM (preemption, a spot instance, `scancel`) or a user's Ctrl-C
without losing work: running trainings checkpoint at their next step boundary and end, the
other stages stop between their units, MLflow runs end KILLED with the reason, the command
exits non-zero (128 + the signal); what has not ended within the grace is killed, with every
process the command started.

    >>> preemption.install(grace_s=30)        # the command line, at start
    >>> with preemption.watching(train_out):  # a training asked to stop gets STOP_REQUESTED
    ...     fit()
    >>> preemption.check()                    # between units of work: raises Preempted if asked

A training polls its output's STOP_REQUESTED file (StopPoll: at every step on a local store,
every few seconds on object storage), which reaches its Ray workers wherever they run: the
file lives in the store they share.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.storage import Output

STOP_FILE = "STOP_REQUESTED"  # in a training's output: checkpoint now and end
STOPPED_FILE = "STOPPED"  # written by the training when it ended on a request (its step)


class Preempted(BaseException):
    """A stop asked for by a signal. Not an error (no retry, no traceback): a BaseException, so
    that it passes every `except Exception` on its way out and Prefect marks the flow run
    Crashed rather than Failed."""

    def __init__(self, signum: int):
        self.signum = signum
        name = signal.Signals(signum).name
        self.reason = f"preempted ({name})" if signum != signal.SIGINT else "interrupted (SIGINT)"
        super().__init__(self.reason)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_lock = threading.Lock()
_watched: set[Output] = set()
_requested: Preempted | None = None
_grace_s = 30.0
_installed = False


class StopPoll:
    """Whether a stop was asked of the training at `out`: its STOP_FILE, looked up at most every
    `poll_s` seconds of its store (a stat at every step locally; on object storage a HEAD
    request, which at every step would cost a small model's step time)."""

    def __init__(self, out: Output):
        self.out, self.every, self.last = out, out.store.poll_s, -math.inf

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return self.out.exists(STOP_FILE)


def requested() -> Preempted | None:
    """The stop asked for, if any."""
    return _requested


def check() -> None:
    """Raises the requested stop, if there is one (call it between units of work)."""
    if _requested is not None:
        raise _requested


def _ask(out: Output) -> None:
    try:
        out.write_text(STOP_FILE, _requested.reason if _requested else "stop")
    except OSError:  # the output is gone: nothing there to stop
        pass


@contextmanager
def watching(out: Output) -> Iterator[None]:
    """Within: a stop request reaches the output `out` as its STOP_FILE (at once, if it came
    before). A request from an earlier process is cleared on entry: a relaunch resumes."""
    for name in (STOP_FILE, STOPPED_FILE):
        out.remove(name)
    with _lock:
        _watched.add(out)
        if _requested is not None:
            _ask(out)
    try:
        yield
    finally:
        with _lock:
            _watched.discard(out)


def request(signum: int) -> None:
    """The signal handler: the first signal asks every watched training to stop and starts the
    grace; a Ctrl-C after it (an impatient user) ends the command at once. A repeated SIGTERM
    changes nothing: schedulers send several (SLURM's `scancel --full` reaches a batch job's
    command directly and again through its script, infra/slurm), and the grace bounds the stop."""
    global _requested
    with _lock:
        first = _requested is None
        if first:
            _requested = Preempted(signum)
            for out in _watched:
                _ask(out)
    if not first:
        if signum == signal.SIGTERM:
            return
        _hard_stop(_requested.exit_code)
    print(
        f"\n{_requested.reason}: stopping at the next step boundary (checkpoint kept); "
        f"all is ended within {_grace_s:.0f} s",
        flush=True,
    )
    threading.Thread(target=_grace, args=(_grace_s,), name="preemption-grace", daemon=True).start()


def _grace(seconds: float) -> None:
    time.sleep(seconds)
    print(f"{_requested.reason}: not ended after {seconds:.0f} s; killing what is left", flush=True)
    _hard_stop(_requested.exit_code)


def _hard_stop(code: int) -> None:
    """Ends this process and every process it started (Ray's, Prefect's server), now."""
    kill_all(descendants(os.getpid()))
    os._exit(code)


def kill_all(pids: list[int]) -> None:
    """SIGKILL to each of `pids` still alive (one that ended meanwhile is skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children first, then theirs)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def set_grace(seconds: float) -> None:
    """How long a stop may take before what is left is killed (train.preempt_grace_s)."""
    global _grace_s
    _grace_s = seconds


def install(grace_s: float = 30.0) -> None:
    """Handles SIGTERM and SIGINT in this (main) thread; again after a library replaced them
    (ray.init installs its own SIGTERM handler). `grace_s`: how long a stop may take."""
    global _grace_s, _installed
    _grace_s = grace_s
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _frame: request(s))
    _installed = True


def reinstall() -> None:
    """Puts the handlers back if this process installed them: after ray.init (its own SIGTERM
    handler exits at once) and at the start of a Prefect flow (its handler raises in the main
    thread, then waits for the running tasks -- whole trainings -- to end before it stops)."""
    if _installed:
        install(_grace_s)
