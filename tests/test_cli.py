"""The `imf` entry point: its contract (docs/architecture.md), exit 2 for bad input."""

import pytest

from flows.cli import main


def test_help_lists_the_contract(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("precompute", "train", "evaluate", "run", "sweep", "report"):
        assert command in out
    assert "example: imf run -e demo train.steps=500" in out


@pytest.mark.parametrize(
    "command, shown",
    [
        ("run", ["demo, imagenet_b2, smoke (default: smoke)", "train.steps=100"]),
        ("train", ["demo, imagenet_b2, smoke (default: smoke)", "key=value"]),
        ("sweep", ["table1b        scales: paper, smoke, mnist", "(default: smoke)", "--seeds"]),
        ("report", ["table1a, table1b", "example: imf report table1b --scale smoke"]),
    ],
)
def test_each_commands_help_lists_its_choices(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in shown:
        assert " ".join(text.split()) in out, text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "-e", "nosuch"], "no experiment 'nosuch' (known: demo, imagenet_b2, smoke;"),
        (["run", "--config-dir", "/no/such", "-e", "smoke"], "/no/such is not a directory"),
        (["run", "-e", "smoke", "train.stpes=3"], "train.stpes"),
        (["sweep", "nosuch"], "no sweep 'nosuch'"),
        (["sweep", "table1a", "--scale", "huge"], "no scale 'huge'"),
        (["sweep", "table1a", "--only", "mf,nope"], "no variant(s) ['nope'] (its variants: mf,"),
        (["run", "-e", "smoke", "train.steps=-5"], "train.steps must be >= 0"),
        (["train", "-e", "smoke", "train.batch_size=0"], "train.batch_size and train.num_workers"),
        (["run", "-e", "smoke", "train.num_workers=3"], "does not split over train.num_workers 3"),
        (["evaluate", "-e", "smoke", "eval.n_samples=0"], "eval.n_samples must be >= 2"),
        (["run", "-e", "smoke", "eval.omegas=[]"], "eval.omegas must be a non-empty list"),
        (["run", "-e", "smoke", "eval.nfe=3"], "eval.nfe must be 1 or 2"),
        (["run", "-e", "smoke", "eval.intervals=[[0.6,0.2]]"], "eval.intervals: each must be"),
        (
            ["run", "-e", "smoke", "eval.features=inception", "eval.inception_weights=/no.pth"],
            "never downloaded",
        ),
        (["sweep", "table1a", "eval.features=inception"], "never downloaded"),
        (["evaluate", "-e", "smoke", "eval.checkpoint=/no/such.pth"], "is not a file"),
        (
            ["train", "-e", "smoke", "tracking.uri=http://127.0.0.1:9"],
            "the MLflow tracking server at http://127.0.0.1:9 does not answer",
        ),
        (["run", "-e", "smoke", "tracking.uri=http://127.0.0.1:9"], "does not answer"),
        # A new user's common mistakes (issue 15): each one line, naming what would be valid.
        (["run", "-e", "smoke", "model.name=tny"], "unknown model preset 'tny'; known: ['imf_b2'"),
        (["run", "-e", "smok"], "did you mean 'smoke'?"),
        (
            ["report", "tabel1b"],
            "no sweep 'tabel1b' (did you mean 'table1b'? known: omega_study, table1a,",
        ),
        (["report", "table1b", "--scale", "huge"], "(its scales: paper, smoke, mnist)"),
        (
            ["report", "table1b", "--scale", "paper"],
            "no MLflow run of sweep 'table1b' at scale 'paper' in this tracking store "
            "(run `imf sweep table1b --scale paper` first)",
        ),
        (["run", "-e", "smoke", "eval.omegas=1.5"], "a list is needed, e.g. eval.omegas=[1.0,2.0]"),
        (["run", "-e", "smoke", "train.steps", "100"], "write key=value (e.g. train.steps=100)"),
        (["run", "-e", "smoke", "train.steps=abc"], "bad value 'abc' for 'train.steps'"),
        (["run", "-e", "smoke", "train.stpes=3"], "unknown key 'train.stpes'"),
    ],
)
def test_bad_input_fails_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert not (tmp_path / "artifacts").exists()


def test_overrides_may_follow_options(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The override after the options reaches the config (and its typo is reported) ...
    assert main(["sweep", "table1a", "--scale", "smoke", "--only", "mf", "train.stpes=5"]) == 2
    assert "train.stpes" in capsys.readouterr().err
    # ... while an unknown option is still an argparse error.
    with pytest.raises(SystemExit):
        main(["sweep", "table1b", "--scale", "smoke", "--bogus", "train.steps=5"])


def test_evaluate_given_official_weights_trains_nothing(capsys, tmp_path, monkeypatch):
    import torch

    from imf_core.models import create
    from imf_core.models.official import to_official

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = create("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(to_official(model), tmp_path / "iMF-tiny.pth")
    args = ["eval.n_samples=100", "eval.shard_size=100", "eval.omegas=[1.0,2.0]"]
    args += ["eval.grid_per_class=0", "precompute.classifier_steps=50", "eval.calibrate=false"]
    args += ["eval.many_steps=0"]
    argv = ["evaluate", "-e", "smoke", f"eval.checkpoint={tmp_path / 'iMF-tiny.pth'}", *args]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "computed 2 unit(s)" in out and "FID" in out, out
    assert "calibration" in out and "not computed" in out  # said, not silently missing
    assert (tmp_path / "artifacts" / "evaluate").is_dir()
    assert not (tmp_path / "artifacts" / "train").exists()  # no training happened
    assert main(["run", "-e", "smoke", f"eval.checkpoint={tmp_path / 'iMF-tiny.pth'}"]) == 2
    assert "imf evaluate" in capsys.readouterr().err


def test_a_tokenizer_folder_without_config_json_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae").mkdir()
    argv = [
        "evaluate",
        "-e",
        "smoke",
        "tokenizer.name=sd_vae",
        f"tokenizer.path={tmp_path / 'vae'}",
    ]
    assert main(argv) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


def test_runs_of_dead_processes_are_marked_killed_and_ctrl_c_is_named(tmp_path):
    import subprocess

    from tasks.storage import Output
    from tasks.tracking import end_run, open_run, owner_tags, reap_dead_runs
    from tasks.tracking_client import client

    uri = f"sqlite:///{tmp_path}/m.db"
    dead = subprocess.Popen(["true"])
    dead.wait()
    runs = client(uri)
    orphan = open_run(uri, Output.at(tmp_path / "a"), "exp", "orphan", {}, dict)
    runs.set_tag(orphan, "imf.pid", str(dead.pid))  # as if its process had been SIGKILLed
    assert reap_dead_runs(uri) == [orphan]
    assert runs.get_run(orphan).info.status == "KILLED"
    runs.update_run(orphan, "RUNNING")  # once more: the next command that opens a run sees it
    mine = open_run(uri, Output.at(tmp_path / "b"), "exp", "mine", {}, dict)
    assert runs.get_run(orphan).info.status == "KILLED" and reap_dead_runs(uri) == []
    assert "is gone" in runs.get_run(orphan).data.tags["error"]
    assert runs.get_run(mine).info.status == "RUNNING"  # this process is alive
    assert runs.get_run(mine).data.tags["imf.pid"] == owner_tags()["imf.pid"]

    end_run(f"sqlite:///{tmp_path}/m.db", mine, KeyboardInterrupt())
    assert runs.get_run(mine).info.status == "KILLED"
    assert runs.get_run(mine).data.tags["error"] == "interrupted by the user"
    # Reopening a killed run resumes it, owned by this process.
    assert open_run(uri, Output.at(tmp_path / "a"), "exp", "orphan", {}, dict) == orphan
    assert runs.get_run(orphan).info.status == "RUNNING"


def test_a_full_disk_refuses_training_up_front(capsys, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import tasks.storage

    monkeypatch.chdir(tmp_path)
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage

    def nearly_full(path):  # precompute's shards still fit; a training's checkpoints do not
        return usage(real(path).total, real(path).total - 2_000_000, 2_000_000)

    monkeypatch.setattr(tasks.storage.shutil, "disk_usage", nearly_full)
    assert (
        main(["train", "-e", "smoke", "precompute.classifier_steps=0", "train.eval_every=0"]) == 2
    )
    err = capsys.readouterr().err
    assert "not enough disk for training" in err and "GB are free" in err
    assert not list((tmp_path / "artifacts").glob("train/*/ray"))  # Ray never started


def test_a_full_disk_refuses_precompute_up_front(capsys, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import tasks.storage

    monkeypatch.chdir(tmp_path)
    usage = namedtuple("usage", "total used free")
    total = shutil.disk_usage(tmp_path).total
    # digits: 1,797 rows of 64 float32 + 17 bytes = 0.49 MB; 0.3 MB free
    full = usage(total, total, 300_000)
    monkeypatch.setattr(tasks.storage.shutil, "disk_usage", lambda path: full)
    assert main(["precompute", "-e", "smoke"]) == 2
    assert "not enough disk for precompute's 1797 rows" in capsys.readouterr().err
    assert not list((tmp_path / "artifacts").glob("precompute/*/*.parquet"))


@pytest.mark.parametrize("command", ["train", "evaluate", "run", "sweep"])
def test_recompute_stale_is_the_config_key_for_every_command_that_reuses(command, monkeypatch):
    import flows.cli

    seen = {}
    monkeypatch.setitem(flows.cli.COMMANDS, command, lambda args: seen.update(vars(args)) or 0)
    argv = [command] + (["table1a"] if command == "sweep" else []) + ["--recompute-stale"]
    assert flows.cli.main([*argv, "train.steps=5"]) == 0
    assert seen["overrides"] == ["train.steps=5", "paths.recompute_stale=true"]


def test_the_printout_of_outputs_tracked_elsewhere_says_so(tmp_path, capsys):
    """`imf run` reusing outputs whose runs another tracking.uri holds ends with a line that
    says so, not an MlflowException after a successful run."""
    from types import SimpleNamespace

    from flows.run_printout import print_where_to_look
    from tasks.config import load_config
    from tasks.evaluate import EvalResult
    from tasks.train import TrainResult

    uri = f"sqlite:///{tmp_path}/other.db"
    cfg = load_config("smoke", [f"tracking.uri={uri}"])
    rows = [{"omega": 1.0, "t_min": 0.0, "t_max": 1.0, "best": True}]
    trained = TrainResult(tmp_path / "train" / "t", "t", False, 10, "a" * 32)
    evaluated = EvalResult(tmp_path / "evaluate" / "e", "e", False, 0, rows, "b" * 32)
    print_where_to_look(cfg, SimpleNamespace(train=trained, evaluate=evaluated))
    out = capsys.readouterr().out
    assert f"the training run is not in {uri}: its outputs were made with" in out
    assert "/#/experiments/" not in out  # no link to a run this server does not hold
    assert f"{evaluated.out.uri}/results.json" in out
