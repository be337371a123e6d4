"""A training's MLflow record, journaled: rank 0 appends to a local JSONL journal beside the
checkpoints and a background thread sends it to MLflow, so a tracking outage neither stops nor
slows training; what the server did not take is replayed later (tasks.tracking.prepare)."""

from __future__ import annotations

import json
import threading
import time

from tasks.storage import Output, Store
from tasks.tracking_client import client, finish


class RunJournal:
    """Rank 0's MLflow record of a training, written first to a local JSONL journal beside the
    checkpoints and sent from there by a background thread: a tracking outage neither stops
    nor slows training. What the server did not take stays in the journal; `replay` sends it
    when the server is back (the end of this training, its resume, or any later `imf` command),
    in order and once. The journal also says which steps were logged, so a training resumed
    from a checkpoint logs the steps it runs again only once."""

    def __init__(self, uri: str, run_id: str, out: Output, flush_every: float = 2.0):
        self.uri, self.run_id, self.out = uri, run_id, out  # the training's output
        self.logged: dict[str, int] = {}  # per group of metrics: the last step journaled
        for record in read_journal(out):
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
            self.out,
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
        append_record(self.out, {"run_id": self.run_id, "tags": values})
        self._unsent.set()

    def artifact(self, name: str, data: bytes, directory: str) -> None:
        """Keeps the file `name` (a sample grid's PNG) beside the journal until it is sent to
        the run's artifact `directory`."""
        self.out.write_bytes(f"{FILES}/{name}", data)
        append_record(self.out, {"run_id": self.run_id, "artifact": name, "dir": directory})
        self._unsent.set()

    def _send(self) -> int:
        self._unsent.clear()
        if self._runs is None:
            self._runs = client(self.uri)
        left = replay(self.out, self.uri, quiet=True, runs=self._runs)
        if left:
            self._unsent.set()  # the server is away: try again at the next tick
        return left

    def _flush_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            if self._unsent.is_set():
                try:
                    self._send()
                except Exception:  # noqa: BLE001 - the store is away: the next tick retries
                    self._unsent.set()

    def close(self, timeout: float = 30.0) -> int:
        """Stops the flusher and makes one last attempt; returns the records still unsent."""
        self._stop.set()
        self._flusher.join(timeout)
        return self._send()


JOURNAL = "mlflow_journal.jsonl"
SENT = "mlflow_journal.sent"  # how many of the journal's records MLflow has taken
FILES = "journal_files"  # the artifacts (sample grids) kept until sent


def append_record(out: Output, record: dict) -> None:
    out.append_line(JOURNAL, json.dumps(record))


def read_journal(out: Output) -> list[dict]:
    """The journal of the training `out`: its complete records (a line cut short by a kill
    is not one)."""
    records = []
    for line in out.read_lines(JOURNAL):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def replay(out: Output, uri: str, quiet: bool = False, runs=None) -> int:
    """Sends the unsent records of the training `out`'s journal to MLflow in order; returns
    how many remain unsent (0: the run's MLflow record is complete). SENT counts the records
    sent, under the journal's lock, so the flusher, the driver and a later command never send
    one twice."""
    records = read_journal(out)
    if not records:
        return 0
    with out.lock(part="journal"):
        done = int(out.read_text(SENT) or 0) if out.exists(SENT) else 0
        if done < len(records) and runs is None:
            runs = client(uri)
        for i in range(done, len(records)):
            try:
                send_record(runs, out, records[i])
            except Exception as err:  # the server is away: the rest waits for the next replay
                if not quiet:
                    print(
                        f"MLflow at {uri} is unreachable ({type(err).__name__}); "
                        f"{len(records) - i} records stay in the journal of {out.uri} and are "
                        "sent later"
                    )
                return len(records) - i
            out.write_text(SENT, str(i + 1))
    return 0


def send_record(runs, out: Output, record: dict) -> None:
    from mlflow.entities import Metric

    run_id = record["run_id"]
    if "metrics" in record:
        batch = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
        runs.log_batch(run_id, metrics=batch)
    elif "tags" in record:
        from mlflow.entities import RunTag

        runs.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif "artifact" in record:
        kept = out.local_path(f"{FILES}/{record['artifact']}")
        runs.log_artifact(run_id, str(kept), record["dir"])
    elif "end" in record:
        finish(runs, run_id, record["end"], record.get("error", ""))


def replay_all(store: Store, uri: str) -> int:
    """Replays every training journal in `store` that has unsent records (after an outage,
    the next command completes the MLflow record). Returns the records still unsent."""
    # replay itself reads the journal once and opens a client only when something is unsent
    return sum(replay(out, uri) for out in store.outputs("train/*"))
