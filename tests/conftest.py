"""Shared fixtures: one Prefect test server and one local Ray per session (each takes seconds to
start), another Ray on the machine, a stale record of a dead one."""

import os
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
