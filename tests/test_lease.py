""" "One launch computes" across hosts (tasks.lease): the conditional objects of each store, and
the lease on one local directory shared by processes posing as two hosts."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import lease
from tasks.lease import GUARD_S
from tasks.storage import Output, Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store.of(tmp_path / "artifacts")
    return Store.of(request.getfixturevalue("s3_root"))


def test_each_store_changes_an_object_only_at_the_version_read(store):
    key = "locks/x.lock"
    assert store.read_with_token(key) is None
    first = store.create_if_absent(key, b"one")
    assert first and store.create_if_absent(key, b"two") is None
    assert store.read_with_token(key) == (b"one", first)
    second = store.replace_if_unchanged(key, b"two", first)
    assert second and second != first and store.read_bytes(key) == b"two"
    assert store.replace_if_unchanged(key, b"three", first) is None  # an older version's
    assert not store.delete_if_unchanged(key, first) and store.read_bytes(key) == b"two"
    assert store.delete_if_unchanged(key, second) and store.read_with_token(key) is None
    assert not store.delete_if_unchanged(key, second)


def replace_at(root: str, token: str, start, index: int) -> bool:
    """One of several processes taking over the same version at once."""
    start.wait()
    return Store(root).replace_if_unchanged("locks/x.lock", b"taker %d" % index, token) is not None


def test_of_processes_taking_over_one_version_of_a_lease_file_exactly_one_wins(tmp_path):
    store = Store.of(tmp_path)
    token = store.create_if_absent("locks/x.lock", b'{"expires": 0}')
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(6) as pool:
        results = pool.starmap_async(replace_at, [(store.root, token, start, i) for i in range(6)])
        time.sleep(2)  # every process started and waiting
        start.set()
        won = results.get(60)
    assert won.count(True) == 1
    assert store.read_bytes("locks/x.lock") == b"taker %d" % won.index(True)
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["x.lock"]  # no claim left


def test_a_claim_blocks_a_version_only_until_it_goes_stale(tmp_path):
    """A process that died while changing a lease file leaves its claim: others are refused
    for GUARD_S, then claim the next generation."""
    store = Store.of(tmp_path)
    token = store.create_if_absent("locks/x.lock", b"one")
    claim = tmp_path / "locks" / f".x.lock.{token[:32]}.0"
    claim.write_text(json.dumps({"at": time.time()}))
    assert store.replace_if_unchanged("locks/x.lock", b"two", token) is None
    claim.write_text(json.dumps({"at": time.time() - GUARD_S - 1}))
    assert store.replace_if_unchanged("locks/x.lock", b"two", token)
    assert store.read_bytes("locks/x.lock") == b"two" and not claim.exists()


def test_a_holder_is_gone_only_when_it_ran_here_and_its_process_has_ended():
    me = lease.owner_record()
    assert not lease.gone(me)  # running
    assert lease.gone(me | {"started": "1"})  # its pid now runs another process
    assert not lease.gone(me | {"started": "1", "host": "elsewhere"})  # expiry decides there
    assert not lease.gone(me | {"started": "1", "machine": "another-boot/pid:[1]"})
    assert lease.gone(me | {"pid": 2**22 + 1})  # beyond any pid: runs nothing


AS_HOST = """
import socket, sys, time
socket.gethostname = lambda: sys.argv[1]  # a process posing as another host
from tasks.lease import Lease
from tasks.storage import Output, Store
out = Output.at(sys.argv[2])
"""

COMPUTE = (
    AS_HOST
    + """
with out.lock("training", say=lambda line: print(line, flush=True)):
    if out.exists("_SUCCESS"):
        print("reused", flush=True)
    else:
        print("computing", flush=True)
        time.sleep(2)
        out.write_text(f"by-{sys.argv[1]}", "")
        out.write_text("_SUCCESS", "")
"""
)

HOLD = (
    AS_HOST
    + """
Lease(out.store, "locks/train-k.lock", seconds=float(sys.argv[3])).acquire(print)
print("held", flush=True)
time.sleep(600)
"""
)


def as_host(script: str, host: str, *args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, host, *args], stdout=subprocess.PIPE, text=True, env=env
    )


def test_of_two_hosts_on_one_directory_one_computes_and_the_other_waits_and_reuses(tmp_path):
    where = str(tmp_path / "train" / "k")
    first = as_host(COMPUTE, "host-a", where)
    assert first.stdout.readline().strip() == "computing"
    second = as_host(COMPUTE, "host-b", where)
    outputs = [p.communicate(timeout=60)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert "is being computed by" in outputs[1] and '"host": "host-a"' in outputs[1]
    assert outputs[1].strip().endswith("reused"), outputs
    assert Output.at(where).list("by-*") == ["by-host-a"]  # computed once
    assert not (tmp_path / "locks" / "train-k.lock").exists()  # released


def kill_holder(script_args: tuple[str, ...], host: str, root: Path) -> None:
    holder = as_host(HOLD, host, str(root / "train" / "k"), *script_args)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_dead_holder_on_another_host_blocks_until_its_lease_expires(tmp_path):
    kill_holder(("3",), "host-b", tmp_path)
    began, waited = time.monotonic(), []
    with Output.at(tmp_path / "train" / "k").lock("training", say=waited.append):
        took = time.monotonic() - began
        assert waited and '"host": "host-b"' in waited[0]
    assert 1.0 < took < 10  # the rest of its 3 s lease, not at once, not forever


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    import socket

    kill_holder(("600",), socket.gethostname(), tmp_path)
    waited = []
    with Output.at(tmp_path / "train" / "k").lock("training", say=waited.append):
        assert waited == []  # its lease had 10 minutes left
