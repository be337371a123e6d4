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
from tasks.object_store import S3Store, cache_dir
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
    assert out.read_lines("journal.jsonl") == ['{"step": 1}', '{"step": 2}']


def test_directory_markers_are_no_files_of_an_output(s3_root):
    """pyarrow's filesystem (Ray Train's checkpoints) leaves empty `dir/` objects: an output's
    listing and its move see its files only (copying a marker failed on SeaweedFS)."""
    store = Store.of(s3_root)
    out = store.output("train", "k1")
    out.write_text("ray/run/state.pt", "x")
    store.fs.create_dir(store.fs_path(f"{out.rel}/ray/run/checkpoint_0"))
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.object(out.rel))
    assert any(item["Key"].endswith("/") for item in listed["Contents"])  # a marker is there
    assert out.list("*") == out.list("*/*/*/*") == []  # no "" nor "ray/run/checkpoint_0/"
    assert out.list("*/*/*") == ["ray/run/state.pt"]
    kept = store.output("kept", "k1")
    out.move_to(kept)
    assert kept.read_text("ray/run/state.pt") == "x" and not out.list("*/*/*")


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
    assert store.create_if_absent("locks/x.lock", b"{}") is None
    current, _ = store.read_with_token("locks/x.lock")
    assert json.loads(current)["expires"] > time.time()
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


def test_lost_and_corrupt_shards_in_the_store_are_recomputed_alone(s3_root):
    """Per-shard repair on `s3://`: a deleted shard object and one overwritten at the same
    size are rebuilt, to the same bytes; the others are not rewritten (same LastModified)."""
    from tasks.precompute import PrecomputeJob, precompute
    from tasks.schema import DataConfig, PrecomputeConfig, TokenizerConfig

    job = PrecomputeJob(
        DataConfig(name="digits"),
        TokenizerConfig(name="pixel"),
        PrecomputeConfig(rows_per_shard=500, rows_per_row_group=100),
        s3_root,
    )
    out = precompute(job).out
    store, names = out.store, out.list("shard-*.parquet")
    assert names == [f"shard-{i:05d}.parquet" for i in range(4)]

    def written() -> dict[str, object]:
        return {n: store._head(f"{out.rel}/{n}")["LastModified"] for n in names}

    before, original = written(), {n: out.read_bytes(n) for n in names}
    time.sleep(1.1)  # LastModified counts whole seconds
    out.remove("shard-00001.parquet")
    data = bytearray(original["shard-00002.parquet"])
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the checksum can tell
    out.write_bytes("shard-00002.parquet", bytes(data))
    again = precompute(job)
    assert again.shards_written == ["shard-00001.parquet", "shard-00002.parquet"]
    after = written()
    assert {n: after[n] for n in ("shard-00000.parquet", "shard-00003.parquet")} == {
        n: before[n] for n in ("shard-00000.parquet", "shard-00003.parquet")
    }  # untouched ...
    assert after["shard-00002.parquet"] != before["shard-00002.parquet"]  # ... as rewrites show
    assert {n: out.read_bytes(n) for n in names} == original  # rebuilt to the same bytes


def test_a_training_looks_for_its_stop_file_on_the_store_every_few_seconds(s3_root, tmp_path):
    """Not a HEAD request per step: a stop asked between two looks is seen at the next look."""
    from tasks.preemption import STOP_FILE, StopPoll

    out = Store.of(s3_root).output("train", "k")
    poll = StopPoll(out)
    assert poll.every == S3Store.poll_s == 2.0
    assert poll() is False  # looked: nothing asked
    out.write_text(STOP_FILE, "stop")
    poll.last = time.monotonic()  # as if it had just looked (a loaded machine's write is slow)
    assert poll() is False  # asked, but not looked for yet: within 2 s of the last look
    poll.last -= poll.every  # 2 s later
    assert poll() is True
    assert StopPoll(Store.of(tmp_path).output("train", "k")).every == 0  # a stat: every step


def shard_output(root: str, key: str, mb: int = 1) -> Output:
    """A finished precompute output in the store: one uncompressed shard of `mb` MB."""
    out = Store.of(root).output("precompute", key)
    values = np.arange(mb * 250_000, dtype=np.float32)
    table = pa.table({"x": values})
    out.write_table("shard-00000.parquet", table, compression="none", use_dictionary=False)
    Manifest(key, "precompute", {}, [], [FileRecord.of(out, "shard-00000.parquet")]).write(out)
    return out


def map_shard(root: str, key: str, env: dict, started, release, kept) -> None:
    """A worker on the node: memory-maps an output's shard from the cache, holds it until
    told, then says whether its mapping still reads the shard whole."""
    import os

    os.environ.update(env)
    path = Store.of(root).output("precompute", key).local_copy() / "shard-00000.parquet"
    import pyarrow.parquet as pq

    shard = pq.ParquetFile(pa.memory_map(str(path)))
    started.set()
    release.wait(60)
    whole = np.array_equal(shard.read()["x"].to_numpy(), np.arange(250_000, dtype=np.float32))
    kept.value = int(whole and path.exists())


def read_outputs(root: str, keys: list[str], env: dict) -> None:
    """A process on the node that reads outputs through the cache, then ends."""
    import os

    os.environ.update(env)
    for key in keys:
        Store.of(root).output("precompute", key).local_copy()


def cached(out: Output) -> bool:
    """Whether the node cache holds the output's shard (looked at, not read: no pin)."""
    shard = out.store.object(f"{out.rel}/shard-00000.parquet")
    return (cache_dir() / out.store.bucket / shard).exists()


def test_the_node_cache_keeps_to_its_bound_but_never_evicts_a_file_in_use(s3_root, monkeypatch):
    import os

    monkeypatch.setenv("IMF_CACHE_MAX_GB", "0.0025")  # 2.5 MB: two of the 1 MB shards
    a, b, c = (shard_output(s3_root, k) for k in "abc")
    ctx, env = multiprocessing.get_context("spawn"), dict(os.environ)
    started, release, kept = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    worker = ctx.Process(target=map_shard, args=(s3_root, "a", env, started, release, kept))
    worker.start()
    assert started.wait(60)  # a: the least recently used, memory-mapped by a running worker
    reader = ctx.Process(target=read_outputs, args=(s3_root, ["b"], env))
    reader.start()
    reader.join(60)  # b: read by a process that has ended
    c.local_copy()  # a third does not fit: b goes, a stays (in use)
    assert (cached(a), cached(b), cached(c)) == (True, False, True)
    release.set()
    worker.join(60)
    assert kept.value == 1  # the worker read its shard whole to the end
    b.local_copy()  # once the worker has ended, a goes (c: in use by this process)
    assert (cached(a), cached(b), cached(c)) == (False, True, True)
    monkeypatch.setenv("IMF_CACHE_MAX_GB", "0.0001")  # less than one shard
    d = shard_output(s3_root, "d")
    assert (d.local_copy() / "shard-00000.parquet").stat().st_size > 1e6  # never what it returns


def test_a_journal_on_the_store_appends_in_small_objects_and_reads_back_whole(s3_root):
    """Each line one small PUT, folded every FOLD_EVERY lines into the journal's object (not
    the whole journal rewritten per line); two writers at once lose no line and repeat none."""
    from tasks.object_store import FOLD_EVERY, PARTS

    out = Store.of(s3_root).output("train", "j")
    for i in range(2 * FOLD_EVERY + 2):
        out.append_line("journal.jsonl", json.dumps({"i": i}))
    assert [json.loads(line)["i"] for line in out.read_lines("journal.jsonl")] == list(
        range(2 * FOLD_EVERY + 2)
    )
    store, key = out.store, f"{out.rel}/journal.jsonl"
    assert store._head(key)["Metadata"] == {"parts": str(2 * FOLD_EVERY)}  # folded twice
    assert len(store.glob(f"{key}{PARTS}", "*")) == 2  # the two lines since

    def write(who: str) -> None:  # a store of its own, as another process has
        mine = Store.of(s3_root).output("train", "j")
        for i in range(40):
            mine.append_line("journal.jsonl", f"{who}{i}")

    threads = [threading.Thread(target=write, args=(who,)) for who in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.read_lines("journal.jsonl")[2 * FOLD_EVERY + 2 :]
    assert sorted(lines) == sorted(f"{who}{i}" for who in "ab" for i in range(40))
    assert [x for x in lines if x[0] == "a"] == [f"a{i}" for i in range(40)]  # each in order
    assert Store.of(s3_root).output("train", "none").read_lines("journal.jsonl") == []
