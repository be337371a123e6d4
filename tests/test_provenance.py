"""Where a run came from: the commit, what is not committed, and the paper-scale refusal."""

import subprocess
from pathlib import Path

import pytest

from tasks.provenance import CodeState, code_state, provenance_tags, require_clean_tree


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


def test_tags_name_the_locked_packages_and_the_device():
    tags = provenance_tags("cpu")
    assert tags["imf.device"] == "cpu" and len(tags["imf.lock_sha256"]) == 64
    assert tags["imf.git_dirty"] in ("true", "false")


def test_a_paper_scale_sweep_refuses_uncommitted_code(monkeypatch, capsys):
    from flows import cli

    class Started(Exception):
        pass

    def run_sweep(*args, **kwargs):
        raise Started

    dirty = CodeState("abc", ("tasks/train.py",), "f00")
    monkeypatch.setattr("tasks.provenance.code_state", lambda repo=None: dirty)
    monkeypatch.setattr("flows.sweep.run_sweep", run_sweep)
    assert cli.main(["sweep", "table1a", "--scale", "paper"]) == 2
    assert "not committed (tasks/train.py)" in capsys.readouterr().err
    with pytest.raises(Started):  # past the check, into the sweep
        cli.main(["sweep", "table1a", "--scale", "paper", "--allow-dirty"])
    with pytest.raises(Started):  # smaller scales run from any tree
        cli.main(["sweep", "table1a", "--scale", "smoke"])
