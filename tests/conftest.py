"""Shared fixtures: one Prefect test server and one local Ray per session (each takes seconds to
start), another Ray on the machine, a stale record of a dead one; background scenarios."""

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, started on first use the way every command starts its own
    (tasks.cluster), with 5 logical CPUs on this machine's 2: tests run trainings side by side
    (two of two workers and one of one), as `imf sweep --concurrency` does."""
    from tasks.cluster import connect_ray, shutdown_ray

    connect_ray("", 5)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def other_ray():
    """Another Ray on the machine, as a user's own `ray start` leaves it: alive, and the
    "current cluster" of its temp folder's record. A command run with RAY_TMPDIR=`temp` finds
    it the way one finds a foreign Ray in the machine's /tmp/ray (issue 33)."""
    from services import ray_cluster, ray_temp_dir

    with ray_temp_dir() as temp, ray_cluster(temp) as address:
        yield SimpleNamespace(address=address, temp=temp)


@pytest.fixture(scope="session")
def stale_ray_record():
    """A Ray temp folder whose record of "the current cluster" names one that is gone, as a
    killed `ray start` leaves it; its RAY_TMPDIR."""
    from services import free_port, ray_temp_dir

    with ray_temp_dir() as temp:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        yield temp


class Background:
    """Scenarios that run beside the session's other tests. A test marked
    `@pytest.mark.background(scenario=f)` has `f(directory)` started, in a thread, once the
    session's tests are collected, and reads its result through the `background` fixture. The
    scenarios are subprocesses that leave a core idle (a command's imports, a Ray start, a
    compile), and so are the unit tests that run first: side by side, the suite is shorter
    (issue 33). One scenario at a time; only those of the selected tests."""

    def __init__(self) -> None:
        self.futures: dict[str, Future] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.root: Path | None = None

    def start(self, items: list[pytest.Item]) -> None:
        marked = [(i.nodeid, i.get_closest_marker("background")) for i in items]
        marked = [(nodeid, m.kwargs["scenario"]) for nodeid, m in marked if m is not None]
        if not marked:
            return
        self.root = Path(tempfile.mkdtemp(prefix="imf-background-"))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="background")
        for n, (nodeid, scenario) in enumerate(marked):
            directory = self.root / str(n)
            directory.mkdir()
            self.futures[nodeid] = self.pool.submit(scenario, directory)

    def result(self, nodeid: str):
        return self.futures[nodeid].result()  # the scenario's exception, raised in its test

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self.root, ignore_errors=True)


BACKGROUND = Background()


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.option.collectonly:
        BACKGROUND.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    BACKGROUND.close()


@pytest.fixture
def background(request):
    """What this test's background scenario returned (waits for it to end)."""
    return BACKGROUND.result(request.node.nodeid)
