"""Shared fixtures: one Prefect test server and one local Ray per session (each takes seconds to
start); background scenarios."""

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_configure(config: pytest.Config) -> None:
    """The session's own tests compute on one thread: the background scenarios keep the other
    core busy, and torch's two threads then wait on each other at every parallel region
    (test_learning: 47 s alone, 316 s beside the scenarios in a fresh-clone run)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server for the session (tests/services.s3_server)."""
    from services import s3_server as start

    with start(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_root(s3_server, monkeypatch, tmp_path) -> str:
    """`s3://<the session's bucket>/<a prefix of this test's>`, with this process's AWS_
    environment pointing at the session's server and a node-local cache of its own."""
    import secrets

    from services import BUCKET

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IMF_CACHE_DIR", str(tmp_path / "node-cache"))
    return f"s3://{BUCKET}/{secrets.token_hex(4)}/artifacts"


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, started on first use the way every command starts its own
    (tasks.cluster), with 5 logical CPUs on this machine's 2: tests run trainings side by side
    (two of two workers and one of one), as `imf sweep --concurrency` does."""
    from tasks.cluster import connect_ray, shutdown_ray

    connect_ray("", 5)
    yield
    shutdown_ray()


class Background:
    """Scenarios that run beside the session's other tests. A test marked
    `@pytest.mark.background(scenario=f)` has `f(directory)` started, in a thread, once the
    session's tests are collected, and reads its result through the `background` fixture;
    tests marked with the same `f` read one run of it. The scenarios are subprocesses (a
    command's imports, a Ray start, a compile, servers) that leave a core idle, and so are
    most in-process tests: side by side, the suite is shorter (issue 33). One scenario at a
    time, in the order of their tests; only those of the selected tests. Their tests run last,
    so that the session's other tests run beside the scenarios instead of waiting for them."""

    def __init__(self) -> None:
        self.futures: dict[Callable, Future] = {}
        self.seconds: dict[str, float] = {}  # each scenario's own time, for the summary
        self.pool: ThreadPoolExecutor | None = None
        self.root: Path | None = None

    def start(self, items: list[pytest.Item]) -> None:
        scenarios = dict.fromkeys(scenario_of(i) for i in items if scenario_of(i) is not None)
        if not scenarios:
            return
        self.root = Path(tempfile.mkdtemp(prefix="imf-background-"))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="background")
        for n, scenario in enumerate(scenarios):
            directory = self.root / str(n)
            directory.mkdir()
            self.futures[scenario] = self.pool.submit(self.timed, scenario, directory)

    def timed(self, scenario: Callable, directory: Path):
        start = time.monotonic()
        try:
            return scenario(directory)
        finally:
            self.seconds[scenario.__name__] = time.monotonic() - start

    def result(self, scenario: Callable):
        return self.futures[scenario].result()  # the scenario's exception, raised in its test

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self.root, ignore_errors=True)


BACKGROUND = Background()


def scenario_of(item: pytest.Item) -> Callable | None:
    marker = item.get_closest_marker("background")
    return None if marker is None else marker.kwargs["scenario"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: scenario_of(item) is not None)  # stable: their order kept


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.option.collectonly:
        BACKGROUND.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    BACKGROUND.close()


def pytest_terminal_summary(terminalreporter) -> None:
    """Beside the slowest tests (whose setup waits for their scenario): each scenario's time."""
    if BACKGROUND.seconds:
        terminalreporter.write_sep("=", "background scenarios")
        for name, seconds in BACKGROUND.seconds.items():
            terminalreporter.write_line(f"{seconds:.2f}s {name}")


@pytest.fixture
def background(request):
    """What this test's background scenario returned (waits for it to end)."""
    return BACKGROUND.result(scenario_of(request.node))
