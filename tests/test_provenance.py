"""Where a run came from: the commit, what is not committed, and the paper-scale refusal."""

import json
import subprocess
from pathlib import Path

import pytest

from tasks.provenance import (
    CodeState,
    build_record,
    code_state,
    installed_code_state,
    is_checkout,
    provenance_tags,
    require_clean_tree,
)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_a_clean_checkout_names_its_commit_and_a_change_is_hashed(repo):
    clean = code_state(repo)
    assert len(clean.commit) == 40 and not clean.dirty and clean.diff_sha256 == ""
    require_clean_tree(repo)  # nothing to refuse
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 1\n")
    dirty = code_state(repo)
    assert dirty.commit == clean.commit and set(dirty.changed) == {"a.py", "new.py"}
    (repo / "new.py").write_text("y = 2\n")
    assert code_state(repo).diff_sha256 != dirty.diff_sha256  # another change, another hash
    with pytest.raises(ValueError, match=r"not committed \(a.py, new.py\).*--allow-dirty"):
        require_clean_tree(repo)


def test_outside_a_checkout_nothing_is_claimed(tmp_path):
    assert code_state(tmp_path) == CodeState("", (), "")


def test_an_installed_package_is_the_code_its_build_recorded(repo, tmp_path_factory, monkeypatch):
    (repo / "requirements.lock").write_text("torch==2.14.1\n")
    git(repo, "add", "requirements.lock")
    git(repo, "commit", "-q", "-m", "lock")
    record = tmp_path_factory.mktemp("site") / "build_record.json"
    record.write_text(json.dumps(build_record(repo)))
    site = record.parent  # where a wheel is installed: no checkout
    state = installed_code_state(site, record)
    assert state.commit == code_state(repo).commit and not state.dirty
    assert state.source == "build record" and len(state.lock_sha256) == 64
    # a virtual environment inside a checkout is not that checkout's code
    (repo / ".venv" / "site-packages").mkdir(parents=True)
    assert is_checkout(repo) and not is_checkout(repo / ".venv" / "site-packages")
    # the image's build, without .git: the build arguments, dirty unless said clean
    monkeypatch.setenv("IMF_BUILD_COMMIT", "a" * 40)
    assert build_record(site)["commit"] == "a" * 40 and build_record(site)["changed"]
    monkeypatch.setenv("IMF_BUILD_DIRTY", "false")
    assert not build_record(site)["changed"]


def test_the_paper_scale_refusal_refuses_code_nobody_recorded(tmp_path):
    assert installed_code_state(tmp_path, tmp_path / "build_record.json").source == "unknown"
    with pytest.raises(ValueError, match="commit is unknown .*--allow-dirty"):
        require_clean_tree(tmp_path)


def test_tags_name_the_locked_packages_and_the_device():
    tags = provenance_tags("cpu")
    assert tags["imf.device"] == "cpu" and len(tags["imf.lock_sha256"]) == 64
    assert tags["imf.git_dirty"] in ("true", "false")


def test_a_paper_scale_sweep_refuses_uncommitted_code(monkeypatch, capsys):
    from flows import cli

    class Started(Exception):
        pass

    def start_ray(*args, **kwargs):  # the sweep's first work, after every check
        raise Started

    dirty = CodeState("abc", ("tasks/train.py",), "f00")
    monkeypatch.setattr("tasks.provenance.code_state", lambda repo=None: dirty)
    monkeypatch.setattr("flows.sweep_config.preflight", lambda cfg: None)  # no ImageNet files here
    monkeypatch.setattr("flows.sweep.start_ray", start_ray)
    assert cli.main(["sweep", "table1a", "--scale", "paper"]) == 2
    assert "not committed (tasks/train.py)" in capsys.readouterr().err
    with pytest.raises(Started):  # past the check, into the sweep
        cli.main(["sweep", "table1a", "--scale", "paper", "--allow-dirty"])
    with pytest.raises(Started):  # smaller scales run from any tree
        cli.main(["sweep", "table1a", "--scale", "smoke"])
