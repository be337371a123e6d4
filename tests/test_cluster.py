"""The command's Ray is its own (tasks.cluster): its address pinned for every process of it, so
that nothing looks up "the current cluster" (issue 33). The end-to-end checks beside another
Ray and a stale record: tests/test_user_view.py and tests/test_preemption.py."""

import logging
import os

from tasks.cluster import quiet_worker_logs, resolved_address


def test_every_process_of_the_commands_ray_knows_its_address(local_ray):
    import ray

    own = os.environ["RAY_ADDRESS"]  # pinned by connect_ray
    assert ray.get_runtime_context().gcs_address.rsplit(":", 1)[1] == own.rsplit(":", 1)[1]

    @ray.remote(num_cpus=0)
    def address_seen_by_a_worker() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    assert ray.get(address_seen_by_a_worker.remote()) == own


def test_auto_is_resolved_once_and_other_addresses_are_kept(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # a Ray job's driver has it
    assert resolved_address("auto") == "10.1.2.3:6379"
    assert resolved_address("head:6379") == "head:6379"


def test_the_worker_hook_names_ray_trains_logger_without_importing_it():
    """The hook spells out the path of Ray Train's context module (importing it cost ~1 s of
    CPU in every Ray worker): the logger it quiets must be the one that module logs on."""
    quiet_worker_logs()
    from ray.train.v2._internal.execution import context

    assert logging.getLogger(context.__file__).level == logging.WARNING


def test_a_command_run_in_process_leaves_its_callers_ray_alone(local_ray, capsys):
    """`main` ends the Ray its command started, not one its caller had (the test session's):
    ending that one restarted Ray for every later test that shares it."""
    import ray

    from flows.cli import main

    own = os.environ["RAY_ADDRESS"]
    assert main(["run", "-e", "no_such_experiment"]) == 2
    assert "no_such_experiment" in capsys.readouterr().err
    assert ray.is_initialized() and os.environ["RAY_ADDRESS"] == own


def test_a_local_ray_whose_chosen_port_is_taken_starts_on_another():
    """The port chosen for a local Ray's GCS can be taken before the GCS binds it (three
    `imf train` started at once, one of them failed so in a fresh-clone run, 2026-12-06): the
    command picks another. Ray takes ~40 s to report that its GCS died (measured here); the
    first start is refused as Ray refuses it, the second is real. In a subprocess: this
    session has its Ray."""
    import subprocess
    import sys

    script = """
import os
import ray
import tasks.cluster as cluster
start, tried = cluster.start_local_ray, []
def first_port_taken(address, *args):
    tried.append(address)
    if len(tried) == 1:
        raise cluster.PortTaken(address)
    return start(address, *args)
cluster.start_local_ray = first_port_taken
cluster.connect_ray("", 1)
port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
print(tried[0] != tried[1] == os.environ["RAY_ADDRESS"] and tried[1].endswith(f":{port}"))
cluster.shutdown_ray()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr[-3000:]


def test_a_port_taken_is_told_from_other_failures_by_rays_message():
    from tasks.cluster import port_taken

    # Ray 2.60's error when its GCS could not bind the chosen port (the fresh-clone failure)
    message = (
        "Failed to start GCS.  Last 1 lines of error files:\n[...] (gcs_server) "
        "grpc_server.cc:134:  An unexpected system state has occurred. [...] Check failed: "
        "server_ Failed to start the grpc server. The specified port is 34861. This means ..."
    )
    assert port_taken(RuntimeError(message), "34861")
    assert not port_taken(RuntimeError(message), "34862")
    assert not port_taken(RuntimeError("Failed to start GCS. Disk full"), "34861")
