"""The artifact store on object storage (tasks.object_store), against a real S3 server
(SeaweedFS, started by the session): what the local layout guarantees, on `s3://`."""

import json
import multiprocessing
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from tasks.artifacts import FileRecord, Manifest, begin
from tasks.lease import Lease
from tasks.object_store import S3Store
from tasks.storage import Output, Store


def test_an_s3_output_reads_back_what_it_wrote(s3_root):
    store = Store.of(s3_root)
    assert isinstance(store, S3Store) and store.root == s3_root
    out = store.output("evaluate", "k1")
    assert not out.exists() and not out.exists("results.json")
    out.write_json("results.json", [{"fid": 1.5}])
    out.write_arrays("units/w1_s00000.npz", n=np.array(3), sums=np.arange(4.0))
    with out.staged("grids/a.png") as tmp:
        tmp.write_bytes(b"\x89PNG")
    table = pa.table({"label": pa.array([1, 2, 3], pa.int32())})
    out.write_table("shard-00000.parquet", table, compression="none")

    assert out.exists() and out.read_json("results.json") == [{"fid": 1.5}]
    assert out.read_arrays("units/w1_s00000.npz")["sums"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert out.list("units/*.npz") == ["units/w1_s00000.npz"]
    assert out.list("*") == ["results.json", "shard-00000.parquet"]  # one level, as a glob
    assert out.parquet("shard-00000.parquet").metadata.num_rows == 3
    assert out.read_table("shard-00000.parquet")["label"].to_pylist() == [1, 2, 3]
    local = out.local_path("grids/a.png")
    assert local.read_bytes() == b"\x89PNG" and out.size("grids/a.png") == 4
    assert out.uri == f"{s3_root}/evaluate/k1" and Output.at(out.uri) == out
    out.append_line("journal.jsonl", '{"step": 1}')
    out.append_line("journal.jsonl", '{"step": 2}')
    assert out.read_text("journal.jsonl").splitlines() == ['{"step": 1}', '{"step": 2}']


def test_a_manifest_publishes_an_s3_output_and_verifies_its_files(s3_root):
    out = Store.of(s3_root).output("train", "k2")
    assert begin(out, "training", False) == ""  # records the code that works on it
    out.write_bytes("ema.safetensors", b"w" * 100)
    Manifest("k2", "train", {}, [], [FileRecord.of(out, "ema.safetensors")]).write(out)
    done = Manifest.read(out)
    assert done is not None and done.files[0].valid_in(out, "sha256")
    out.write_bytes("ema.safetensors", b"x" * 100)  # same size, other bytes
    assert done.files[0].valid_in(out, "size") and not done.files[0].valid_in(out, "sha256")


def test_a_store_that_cannot_be_used_is_refused_in_one_line(s3_root, monkeypatch):
    bucket = s3_root.removeprefix("s3://").split("/")[0]
    assert Store.of(s3_root).check() is None  # the bucket is there, the keys are taken
    with pytest.raises(ValueError, match=r"bucket 'nosuch-bucket' does not exist") as err:
        Store.of("s3://nosuch-bucket/x").check()
    assert "\n" not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ValueError, match=r"refused the credentials of AWS_ACCESS_KEY_ID"):
        Store.of(f"s3://{bucket}/x").check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"no S3 server answers at AWS_ENDPOINT_URL=http://127"):
        Store.of(f"s3://{bucket}/x").check()
    with pytest.raises(ValueError, match=r"expected s3://<bucket>"):
        Store.of("s3://")


def test_the_credentials_travel_with_the_store_but_never_print(s3_root, monkeypatch):
    import pickle

    store = Store.of(s3_root)
    assert "imf-test-secret" not in repr(store) and "imf-test-secret" not in repr(
        store.output("train", "k")
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # a worker without its own: the launcher's
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    worker_side = pickle.loads(pickle.dumps(store))
    worker_side.output("train", "k").write_text("x", "1")
    assert store.output("train", "k").read_text("x") == "1"


def hold(root: str, env: dict, started, release) -> None:
    """A second host: takes the output's lock, says so, holds it until told."""
    import os

    os.environ.update(env)
    with Store.of(root).output("train", "k").lock("training"):
        started.set()
        release.wait(60)


def test_one_launch_computes_across_processes_and_the_other_waits(s3_root, s3_server):
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=hold, args=(s3_root, s3_server.env, started, release))
    other.start()
    assert started.wait(60)
    said, got = [], threading.Event()
    out = Store.of(s3_root).output("train", "k")

    def second() -> None:
        with out.lock("training", say=said.append):
            got.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(3)
    assert not got.is_set() and said and "is being computed by" in said[0]
    release.set()
    waiter.join(30)
    other.join(30)
    assert got.is_set()


def test_a_dead_holders_lease_expires_and_is_taken_over(s3_root):
    store = Store.of(s3_root)
    dead = Lease(store, "locks/train-k.lock", seconds=2)
    dead.acquire(print)
    dead._stop.set()  # its holder died: no more renewals, no release
    started = time.time()
    taker = Lease(store, "locks/train-k.lock", seconds=2)
    waited = []
    taker.acquire(waited.append, poll=0.2)
    assert 1.0 < time.time() - started < 10 and waited  # waited for the expiry, then took it
    holder = json.loads(store.read_bytes("locks/train-k.lock"))
    assert holder["expires"] > time.time()
    taker.release()
    assert not store.is_file("locks/train-k.lock")


def test_a_live_holder_keeps_its_lease_by_renewing_it(s3_root):
    store = Store.of(s3_root)
    holder = Lease(store, "locks/x.lock", seconds=1.5)
    holder.acquire(print)
    time.sleep(3)  # two lease lengths: renewed meanwhile
    other = Lease(store, "locks/x.lock", seconds=1.5)
    assert other._put(IfNoneMatch="*") is None
    current, _ = other._current()
    assert current["expires"] > time.time()
    holder.release()


def test_a_corrupt_object_is_never_read_as_training_data(s3_root):
    out = Store.of(s3_root).output("precompute", "k3")
    shard = pa.table({"label": pa.array(range(64), pa.int32())})
    out.write_table("shard-00000.parquet", shard, compression="none")
    good = out.read_bytes("shard-00000.parquet")
    Manifest("k3", "precompute", {}, [], [FileRecord.of(out, "shard-00000.parquet")]).write(out)
    rotten = bytearray(good)
    rotten[len(good) // 2] ^= 0x01  # one bit flipped: the same size, a size check would pass
    out.write_bytes("shard-00000.parquet", bytes(rotten))
    with pytest.raises(ValueError, match=r"does not hold the bytes its manifest records"):
        out.local_copy()  # what each node's training reads its shards through
    cached = list(out.store.local_path(f"{out.rel}/_SUCCESS").parent.iterdir())
    assert [p.name for p in cached if not p.name.startswith(".")] == ["_SUCCESS"]
    out.write_bytes("shard-00000.parquet", good)  # repaired: read, and kept per node
    assert (out.local_copy() / "shard-00000.parquet").read_bytes() == good
