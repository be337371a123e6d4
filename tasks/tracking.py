"""Everything MLflow: where runs go, creating and reopening them, and what each stage logs.

The stages call these helpers; nothing else in the project imports mlflow. Runs are created by
drivers before any worker starts (SQLite backends lock under concurrent writers); rank 0 of a
training only appends to its run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

# MLflow's client retries an unreachable server for ~4 minutes (7 retries, doubling backoff):
# a training's journal retries on its own, so a few seconds of retrying is enough (env wins).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def tracking_uri(cfg) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute for workers)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


@dataclasses.dataclass(frozen=True)
class TrackingTarget:
    """Where a stage's MLflow run goes, resolved once from the experiment (TrackingTarget.of)."""

    uri: str  # tracking_uri: absolute, so that workers in other directories find it
    experiment: str  # tracking.experiment, else the experiment config's name
    run_name: str  # tracking.run_name ("" = the stage names its run)
    tags: dict[str, str]  # tracking.tags: the variant, its row, a sweep's parent run

    @classmethod
    def of(cls, cfg) -> TrackingTarget:
        t = cfg.tracking
        return cls(tracking_uri(cfg), t.experiment or cfg.name, t.run_name, dict(t.tags))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer before any stage starts (MLflow's own client retries a
    dead server for minutes): one quick /health request, then the login (check_login). Local
    stores need no check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            problem = "" if answer.status == 200 else f"HTTP {answer.status}"
    except OSError as err:
        problem = str(getattr(err, "reason", err))
    if problem:
        raise ConnectionError(
            f"the MLflow tracking server at {uri} does not answer ({problem}); start it, or set "
            "tracking.uri (or MLFLOW_TRACKING_URI) to a reachable server or a local sqlite:/// file"
        )
    check_login(uri, timeout)


# What MLflow's client logs in with: the environment only, never a config key or the URI
# (the config is recorded as a run's params, and URIs are printed).
USER = "MLFLOW_TRACKING_USERNAME"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"
TOKEN = "MLFLOW_TRACKING_TOKEN"


def login_headers() -> dict[str, str]:
    """The Authorization header MLflow's client sends: basic with a user and password from
    the environment, else a bearer token, else none."""
    import base64

    user, password = os.environ.get(USER), os.environ.get(PASSWORD)
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    if os.environ.get(TOKEN):
        return {"Authorization": f"Bearer {os.environ[TOKEN]}"}
    return {}


def check_login(uri: str, timeout: float = 5.0) -> None:
    """One search with the environment's login: a server running MLflow's basic-auth app
    answers 401 to a missing or wrong one, a server without it ignores the header.
    Refused here, a command stops before any work, naming the variables, not in the middle
    of a sweep."""
    import urllib.error
    import urllib.request

    search = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        request = urllib.request.Request(search, headers=login_headers())
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            sent = login_headers().get("Authorization", "").split(" ")[0]
            given = {"Basic": f"user {os.environ.get(USER)!r}", "Bearer": f"{TOKEN} set"}
            raise PermissionError(
                f"MLflow at {uri} refused the credentials (HTTP 401, "
                f"{given.get(sent, 'no login set')}): set {USER}/{PASSWORD}"
            ) from None
        if err.code == 403:  # a search needs no permission: MLflow's Host check, or a proxy
            answer = " ".join(err.read().decode(errors="replace").split())[:200]
            raise PermissionError(
                f"MLflow at {uri} refused the request (HTTP 403: {answer}); a server reached "
                "by another name than localhost needs it in `mlflow server --allowed-hosts`"
            ) from None
        raise


def check_no_password(uri: str) -> None:
    """A password in the tracking URI would be recorded (the config is a run's params) and
    printed: logins come from the environment."""
    from urllib.parse import urlsplit

    if urlsplit(uri).password is not None:
        raise ValueError(
            "tracking.uri (or MLFLOW_TRACKING_URI) holds a password, which would be recorded "
            f"with every run: remove it and set {USER}/{PASSWORD} (for a database URI, its "
            "driver's variable, e.g. PGPASSWORD)"
        )


def prepare(cfg) -> None:
    """Before any stage: the URI holds no password, the server answers and takes the login
    (or a clear error, at once), and what an outage left in earlier trainings' journals is
    sent now, completing their MLflow records."""
    uri = tracking_uri(cfg)
    check_no_password(uri)
    check_reachable(uri)
    replay_all(Path(cfg.paths.artifacts), uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def client(uri: str):
    """An MLflow client for `uri` (callers outside this module never import mlflow)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def get_run_or_none(mlflow_client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        return None


# MLflow 3's UI opens an experiment without this tag in its GenAI mode (traces, judges); the
# classic model-training view is the one whose runs, params and metrics we log.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def experiment_id(runs, name: str) -> str:
    """The experiment `name` (created when missing), marked as a model-training experiment."""
    found = runs.get_experiment_by_name(name)
    if found is None:
        return runs.create_experiment(name, tags={KIND_TAG: MODEL_TRAINING})
    if found.tags.get(KIND_TAG) != MODEL_TRAINING:
        runs.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
    return found.experiment_id


def open_run(
    uri: str,
    id_file: Path,
    experiment: str,
    run_name: str,
    tags: dict,
    params,
    datasets: list | None = None,
) -> str:
    """The MLflow run whose id `id_file` keeps, reopened (RUNNING) on a resume; else a new run
    in `experiment` (created when missing) with `tags`, the params `params()` returns and the
    `datasets` it reads (dataset_input), its id written to `id_file` last, so a kept id always
    names a complete run. On a resume the owner and provenance tags are the resuming
    process's: the code that ran last."""
    from mlflow.entities import Param, RunTag

    from tasks.provenance import provenance_tags

    runs = client(uri)
    reap_dead_runs(uri)  # runs left RUNNING by killed processes: KILLED (or resumed below)
    owner = owner_tags() | provenance_tags()
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        runs.update_run(run_id, "RUNNING")
        runs.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner.items()])
        return run_id
    run_id = runs.create_run(experiment_id(runs, experiment), run_name=run_name, tags=tags | owner)
    run_id = run_id.info.run_id
    items = list(params().items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        batch = [Param(k, v[:500]) for k, v in items[start : start + 100]]
        runs.log_batch(run_id, params=batch)
    if datasets:
        log_inputs(runs, run_id, datasets)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


STALE_TAG = "imf.stale"  # on a run whose numbers another method version made (tasks.artifacts)
TRAINING_METHODS_TAG = "imf.training_method_versions"  # an evaluation's training's (manifest)


def mark_stale(uri: str, run_id: str, reason: str) -> None:
    """Tags the MLflow run of a reused (or resumed) output that another method version made,
    so its page and the sweep report say so; a tracking outage only loses the tag (the
    terminal said it, and the output's manifest records its versions)."""
    if not run_id:
        return
    try:
        client(uri).set_tag(run_id, STALE_TAG, reason)
    except Exception as err:  # noqa: BLE001 - an annotation, never a reason to fail the stage
        print(f"could not tag run {run_id} as stale ({type(err).__name__}: {err})")


def log_inputs(runs, run_id: str, datasets: list) -> None:
    """MLflow's log_inputs, once more if two runs registered the same dataset at once (its SQL
    store creates a dataset row without a lock: concurrent variants of a sweep collided)."""
    from mlflow.exceptions import MlflowException

    try:
        runs.log_inputs(run_id, datasets=datasets)
    except MlflowException:
        time.sleep(0.5)
        runs.log_inputs(run_id, datasets=datasets)


def dataset_input(pre, context: str):
    """The precompute output as an MLflow dataset (the runs table's Dataset column): its data
    and tokenizer as the name, its content key as the digest, its rows in the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from tasks.artifacts import Manifest

    manifest = Manifest.read(Path(pre.path))
    config, extra = manifest.config, manifest.extra
    name = f"{config['data']['name']} ({config['tokenizer']['name']})"
    profile = {"num_rows": extra.get("num_rows"), "num_classes": extra.get("num_classes")}
    schema = {"latent_shape": extra.get("latent_shape"), "flips": extra.get("flips")}
    dataset = Dataset(
        name=name,
        digest=pre.key[:36],
        source_type="local",
        source=json.dumps({"uri": str(Path(pre.path).resolve())}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def end_run(uri: str, run_id: str, error: BaseException | None = None, journal: Path | None = None):
    """Marks the run FINISHED; FAILED with the error as a tag; or KILLED with the reason after
    a stop signal ("preempted (SIGTERM)") or Ctrl-C (a resume reopens it). With a training's
    `journal`, the end is its last record: sent now if the server answers, else by the next
    replay."""
    from tasks.preemption import Preempted

    status, message = "FINISHED", ""
    if isinstance(error, Preempted):  # a signal: checkpointed, a relaunch resumes
        status, message = "KILLED", error.reason
    elif isinstance(error, KeyboardInterrupt | SystemExit):
        status, message = "KILLED", "interrupted by the user"
    elif error is not None:
        status, message = "FAILED", f"{type(error).__name__}: {error}"[:5000]
    if journal is None:
        finish(client(uri), run_id, status, message)
        return
    append_record(journal, {"end": status, "error": message, "run_id": run_id})
    replay(journal, uri)


def finish(runs, run_id: str, status: str, error: str) -> None:
    if error:
        runs.set_tag(run_id, "error", error)
    elif "error" in runs.get_run(run_id).data.tags:  # e.g. reaped while its journal waited
        runs.delete_tag(run_id, "error")
    runs.set_terminated(run_id, status)


def owner_tags() -> dict[str, str]:
    """Which process owns a RUNNING run: reap_dead_runs marks it KILLED once that is gone."""
    return {"imf.host": socket.gethostname(), "imf.pid": str(os.getpid())}


def reap_dead_runs(uri: str) -> list[str]:
    """Marks KILLED every RUNNING run whose owner process on this host is gone (a SIGKILL,
    an OOM kill, a lost machine session): MLflow would show it RUNNING forever. Returns the
    run ids it marked. Runs of other hosts are left to commands there."""
    runs = client(uri)
    experiments = [e.experiment_id for e in runs.search_experiments()]
    if not experiments:
        return []
    host = socket.gethostname()
    where = f"attributes.status = 'RUNNING' and tags.`imf.host` = '{host}'"
    reaped = []
    for run in runs.search_runs(experiments, where, max_results=1000):
        pid = int(run.data.tags.get("imf.pid", "0"))
        if pid and not process_alive(pid):
            runs.set_tag(run.info.run_id, "error", f"killed: its process (pid {pid}) is gone")
            runs.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    return reaped


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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


# The summary numbers charted on a training run's page (see log_evaluation).
HEADLINE = ("fid_best", "fid_no_cfg", "fid_many_step_best")


def log_evaluation(
    job,
    trained,
    key: str,
    results: list[dict],
    points: list[str],
    artifacts: list[Path],
    device: str = "",
) -> str:
    """An MLflow run of the evaluation: the variant's settings, its headline numbers, every
    grid point in a table, the plots and grids.

    Nested under the training run when there is one. The evaluation run is the variant's own
    row in a compare view: it carries the training's params with this evaluation's settings,
    the variant's tags and its headline FIDs -- several evaluations can share one training
    (Tab. 2's 1- and 2-NFE rows, Tab. 1b reusing Tab. 1a's trainings), and each keeps its own
    number. The training run also gets the headline of its own variant's evaluation (the one
    whose variant tag it bears), never another's, beside its training curves. For given weights
    (eval.checkpoint), a run of its own in the experiment, with the checkpoint as params.
    `job` is the evaluation's (tasks.evaluate.EvalJob: its settings, tracking target and the
    precompute output it read, its Dataset), `device` what the units ran on. Returns the run
    id ("" when the training is untracked)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from tasks.artifacts import Manifest, versions_text
    from tasks.provenance import provenance_tags

    train_run = getattr(trained, "mlflow_run_id", "")
    checkpoint = not hasattr(trained, "steps")  # given weights (eval.checkpoint), no training
    if not (train_run or checkpoint):
        return ""
    client = MlflowClient(job.tracking.uri)
    tags = job.tracking.tags | {"stage": "evaluate", "eval_key": key} | provenance_tags(device)
    if not checkpoint:  # which method versions made the training it samples (the report's rows)
        made = Manifest.read(Path(trained.path))
        tags[TRAINING_METHODS_TAG] = versions_text(made.code.get("methods") if made else None)
    omegas = sorted({r["omega"] for r in results})
    grid = f"omega {omegas[0]:g}-{omegas[-1]:g}, {len(results)} points"
    params: dict[str, str] = {}
    own_variant = True
    if train_run:
        parent = client.get_run(train_run)
        experiment = parent.info.experiment_id
        tags["mlflow.parentRunId"] = train_run
        variant = job.tracking.tags.get("variant", "")
        own_variant = parent.data.tags.get("variant", "") == variant
        label = variant if variant and not own_variant else parent.info.run_name
        name = f"{label} / eval ({grid})"
        params = {k: v for k, v in parent.data.params.items() if not k.startswith("eval.")}
    else:
        experiment = experiment_id(client, job.tracking.experiment)
        tags["checkpoint"] = str(trained.weights)
        name = f"eval {trained.weights.name} ({grid})"
    run = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    if job.data is not None:
        log_inputs(client, run, [dataset_input(job.data, "evaluation")])
    source = {"checkpoint_key": trained.key} if checkpoint else {"train_key": trained.key}
    params |= flatten({"eval": dataclasses.asdict(job.eval)} | source)
    items = [Param(k, v[:500]) for k, v in params.items() if v != "None"]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run, params=items[start : start + 100])
    # Every grid point in one table (MLflow's table view), not dozens of single-bar charts.
    client.log_table(run, points_table(results, points), "eval/points.json")
    best = next(r for r in results if r["best"])
    stamp = int(time.time() * 1000)
    summary = summary_metrics(results, job.guidance_mode)
    # A run's page lists its chart sections alphabetically, `eval/` above `train/`: only the
    # FIDs a compare view sets side by side are metrics (one row of charts, the training curves
    # right below on a training run); the rest of the summary (best point, IS, accuracy, floor,
    # ceiling) are tags of those names.
    charted = {k: v for k, v in summary.items() if k in HEADLINE}
    metrics = [Metric(f"eval/{k}", v, stamp, 0) for k, v in charted.items()]
    verdict = [RunTag("did_not_learn", str(best["did_not_learn"]).lower())]
    if best.get("ignores_omega") is not None:
        verdict.append(RunTag("ignores_omega", str(best["ignores_omega"]).lower()))
    rest = [RunTag(f"eval/{k}", f"{v:.6g}") for k, v in summary.items() if k not in charted]
    client.log_batch(run, metrics=metrics, tags=verdict + rest)
    if train_run and own_variant:
        client.log_batch(train_run, metrics=metrics, tags=verdict + rest)
    for path in artifacts:
        client.log_artifact(run, str(path), "grids" if path.parent.name == "grids" else None)
    client.set_terminated(run)
    return run


def points_table(results: list[dict], points: list[str]) -> dict[str, list]:
    """One row per CFG point: FID, IS, accuracy, diversity and the many-step calibration."""
    columns = ("omega", "t_min", "t_max", "fid", "is", "accuracy", "precision", "recall")
    table: dict[str, list] = {"point": list(points)}
    for c in columns:
        if all(c in r for r in results):
            table[c] = [float(r[c]) for r in results]
    if all("many_step" in r for r in results):
        table["many_step_fid"] = [float(r["many_step"]["fid"]) for r in results]
    table["best"] = [bool(r["best"]) for r in results]
    return table


def summary_metrics(results: list[dict], guidance_mode: str) -> dict[str, float]:
    """The best point's numbers (`*_best`), the no-CFG point's (`*_no_cfg`) and the calibration
    every number needs beside it (`eval/` in MLflow; the sweep files name them unprefixed), from
    an evaluation's results.json and the training's guidance.mode."""
    best = next(r for r in results if r["best"])
    names = ("fid", "is", "omega", "t_min", "t_max", "accuracy")
    out = {f"{k}_best": float(best[k]) for k in names if k in best}
    # Without CFG = the omega = 1 point (the interval does not matter there): the paper's
    # "w/o CFG" column for omega-conditioned models.
    no_cfg = next((r for r in results if r["omega"] == 1.0), None)
    if no_cfg is not None and guidance_mode != "fixed":  # fixed: omega is baked in
        out |= {f"{k}_no_cfg": float(no_cfg[k]) for k in ("fid", "is", "accuracy") if k in no_cfg}
    if "real_data_floor" in best:
        out["fid_real_floor"] = best["real_data_floor"]["fid"]
        out["fid_class_mean_ceiling"] = best["class_mean_ceiling"]["fid"]
    if "many_step" in best:
        out["fid_many_step_best"] = best["many_step"]["fid"]
    for name, points in best.get("sensitivity", {}).items():  # e.g. sensitivity_omega_one_step
        out |= {f"sensitivity_{name}_{point}": value for point, value in points.items()}
    return out
