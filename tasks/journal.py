"""A training's MLflow record, journaled: rank 0 appends to a local JSONL journal beside the
checkpoints and a background thread sends it to MLflow, so a tracking outage neither stops nor
slows training; what the server did not take is replayed later (tasks.tracking.prepare)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path

from tasks.tracking_client import client, finish


class RunJournal:
    """Rank 0's MLflow record of a training, written first to a local JSONL journal beside the
    checkpoints and sent from there by a background thread: a tracking outage neither stops
    nor slows training. What the server did not take stays in the journal; `replay` sends it
    when the server is back (the end of this training, its resume, or any later `imf` command),
    in order and once. The journal also says which steps were logged, so a training resumed
    from a checkpoint logs the steps it runs again only once."""

    def __init__(self, uri: str, run_id: str, path: Path, flush_every: float = 2.0):
        self.uri, self.run_id, self.path = uri, run_id, path
        self.files = path.parent / "journal_files"
        self.logged: dict[str, int] = {}  # per group of metrics: the last step journaled
        for record in read_journal(path):
            if "metrics" in record:
                group = record.get("group", "train")
                self.logged[group] = max(self.logged.get(group, 0), record["step"])
        self._runs = None  # one client for the flusher, not a new store connection per flush
        self._unsent = threading.Event()  # set by each append: the flusher idles otherwise
        self._unsent.set()  # a resumed run may hold what an outage kept back
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(flush_every,), name="mlflow-journal", daemon=True
        )
        self._flusher.start()

    def metrics(self, values: dict[str, float], step: int, group: str = "train") -> bool:
        """Journals `values` at `step` unless `group` (the training's own metrics, or the
        evaluations during it) logged that step before; True if journaled."""
        if step <= self.logged.get(group, 0):
            return False
        append_record(
            self.path,
            {
                "run_id": self.run_id,
                "step": step,
                "time": int(time.time() * 1000),
                "metrics": values,
                "group": group,
            },
        )
        self.logged[group] = step
        self._unsent.set()
        return True

    def tags(self, values: dict[str, str]) -> None:
        """Journals run tags (rank 0's device, say: only a worker knows it)."""
        append_record(self.path, {"run_id": self.run_id, "tags": values})
        self._unsent.set()

    def artifact(self, path: Path, directory: str) -> None:
        """Keeps a copy of `path` beside the journal until it is sent."""
        self.files.mkdir(exist_ok=True)
        kept = self.files / path.name
        shutil.copyfile(path, kept)
        append_record(self.path, {"run_id": self.run_id, "artifact": kept.name, "dir": directory})
        self._unsent.set()

    def _send(self) -> int:
        self._unsent.clear()
        if self._runs is None:
            self._runs = client(self.uri)
        left = replay(self.path, self.uri, quiet=True, runs=self._runs)
        if left:
            self._unsent.set()  # the server is away: try again at the next tick
        return left

    def _flush_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            if self._unsent.is_set():
                self._send()

    def close(self, timeout: float = 30.0) -> int:
        """Stops the flusher and makes one last attempt; returns the records still unsent."""
        self._stop.set()
        self._flusher.join(timeout)
        return self._send()


JOURNAL = "mlflow_journal.jsonl"


def append_record(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: Path) -> list[dict]:
    """The journal's complete records (a line cut short by a kill is not one)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def replay(path: Path, uri: str, quiet: bool = False, runs=None) -> int:
    """Sends the journal's unsent records to MLflow in order; returns how many remain unsent
    (0: the run's MLflow record is complete). `<journal>.sent` counts the records sent, under
    a file lock, so the flusher, the driver and a later command never send one twice."""
    records = read_journal(path)
    sent_file = path.with_suffix(".sent")
    if not records:
        return 0
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = int(sent_file.read_text() or 0) if sent_file.is_file() else 0
        if done < len(records) and runs is None:
            runs = client(uri)
        for i in range(done, len(records)):
            try:
                send_record(runs, path.parent, records[i])
            except Exception as err:  # the server is away: the rest waits for the next replay
                if not quiet:
                    print(
                        f"MLflow at {uri} is unreachable ({type(err).__name__}); "
                        f"{len(records) - i} records stay in {path} and are sent later"
                    )
                return len(records) - i
            tmp = sent_file.with_suffix(".tmp")
            tmp.write_text(str(i + 1))
            tmp.replace(sent_file)
    return 0


def send_record(runs, directory: Path, record: dict) -> None:
    from mlflow.entities import Metric

    run_id = record["run_id"]
    if "metrics" in record:
        batch = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
        runs.log_batch(run_id, metrics=batch)
    elif "tags" in record:
        from mlflow.entities import RunTag

        runs.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif "artifact" in record:
        runs.log_artifact(
            run_id, str(directory / "journal_files" / record["artifact"]), record["dir"]
        )
    elif "end" in record:
        finish(runs, run_id, record["end"], record.get("error", ""))


def replay_all(artifacts: Path, uri: str) -> int:
    """Replays every training journal under `artifacts` that has unsent records (after an
    outage, the next command completes the MLflow record). Returns the records still unsent."""
    # replay itself reads the journal once and opens a client only when something is unsent
    return sum(
        replay(journal, uri) for journal in sorted(Path(artifacts).glob(f"train/*/{JOURNAL}"))
    )
