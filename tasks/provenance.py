"""Where a run came from: the code's commit and any change not committed, the locked package
versions, torch, CUDA and the device; recorded as tags on every training and evaluation run.

    >>> provenance_tags()             # {"mlflow.source.git.commit": ..., "imf.git_dirty": ...}
    >>> require_clean_tree()          # paper-scale sweeps refuse uncommitted or unknown code
    >>> code_record()                 # {"package": "0.1.0", "commit": ..., "method": 3}: manifests

Run from a git checkout, the code is the checkout's. Installed (a wheel, the image), there is no
checkout: the code is what the build recorded in tasks/build_record.json (setup.py writes it
from the checkout it builds, or from IMF_BUILD_COMMIT / IMF_BUILD_DIRTY, the image's build
arguments); the tag `imf.code_source` says which.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
METHOD_TAG = "imf.method_version"  # the MLflow tag of imf_core's method version
BUILD_RECORD = Path(__file__).resolve().parent / "build_record.json"  # in built packages only


@dataclass(frozen=True)
class CodeState:
    commit: str  # "" when unknown
    changed: tuple[str, ...]  # modified, added, deleted or untracked (not ignored) paths
    diff_sha256: str  # of `git diff HEAD` and the untracked files' names and bytes
    source: str = "git checkout"  # or "build record", or "unknown"
    lock_sha256: str = ""  # of requirements.lock, as the build saw it (installed packages)

    @property
    def dirty(self) -> bool:
        return bool(self.changed)


def _git(repo: Path, *args: str) -> bytes | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_state(repo: Path = REPO) -> CodeState:
    """The checkout's commit and what differs from it (nothing known outside a checkout)."""
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    if commit is None or status is None:
        return CodeState("", (), "")
    changed = tuple(line[3:] for line in status.decode().splitlines() if line.strip())
    digest = hashlib.sha256(_git(repo, "diff", "HEAD", "--binary") or b"")
    for line in status.decode().splitlines():
        if line.startswith("??"):  # untracked: its name and bytes
            path = repo / line[3:]
            digest.update(line[3:].encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return CodeState(commit.decode().strip(), changed, digest.hexdigest() if changed else "")


def is_checkout(repo: Path) -> bool:
    """Whether `repo` is the top of a git checkout (not a folder inside one, such as a virtual
    environment's site-packages under a project's .venv)."""
    top = _git(repo, "rev-parse", "--show-toplevel")
    return top is not None and Path(top.decode().strip()).resolve() == repo.resolve()


def build_record(repo: Path) -> dict:
    """What setup.py records in a built package: the checkout's state (or the image's build
    arguments) and the lock's hash."""
    if is_checkout(repo):
        state = code_state(repo)
    elif os.environ.get("IMF_BUILD_COMMIT"):  # a build without .git (the image's context)
        clean = os.environ.get("IMF_BUILD_DIRTY", "") == "false"
        changed = () if clean else (f"IMF_BUILD_DIRTY={os.environ.get('IMF_BUILD_DIRTY', '')}",)
        state = CodeState(os.environ["IMF_BUILD_COMMIT"], changed, "")
    else:
        state = CodeState("", (), "", "unknown")
    return asdict(state) | {"lock_sha256": sha256_of(repo / "requirements.lock")}


def installed_code_state(repo: Path = REPO, record: Path = BUILD_RECORD) -> CodeState:
    """The code at `repo`: its checkout's state, else its build record's, else unknown."""
    if is_checkout(repo):
        return code_state(repo)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("commit"):
            saved |= {"changed": tuple(saved["changed"]), "source": "build record"}
            return CodeState(**saved)
    return CodeState("", (), "", "unknown")


@functools.cache
def _process_code_state() -> CodeState:
    """The code this process runs: read once, at its first run (later edits are not its code)."""
    return installed_code_state()


def describe_code(state: CodeState | None = None) -> str:
    """One line for `imf --version`: the commit, whether it was clean, and who says so."""
    state = state or _process_code_state()
    if not state.commit:
        return "commit unknown: not a git checkout and no build record"
    change = f"{len(state.changed)} file(s) not committed" if state.dirty else "clean"
    return f"commit {state.commit[:12]}, {change}, from the {state.source}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def device_name(device) -> str:
    """ "cpu", or the CUDA device's name ("cuda: NVIDIA H200")."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imf-pipeline")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "not installed"


def code_record() -> dict:
    """The code that makes an output, as its manifest records it: the package's version, the
    commit (and whether files differed from it) and imf_core's method version, the one of the
    three that decides whether the output's numbers are this code's (tasks.artifacts.stale)."""
    from imf_core import METHOD_VERSION

    state = _process_code_state()
    return {
        "package": package_version(),
        "commit": state.commit or "unknown",
        "dirty": state.dirty,
        "method": METHOD_VERSION,
    }


def provenance_tags(device=None) -> dict[str, str]:
    """MLflow tags of where a run came from. `mlflow.source.git.commit` is the one MLflow's UI
    shows as the run's commit; the diff hash tells two dirty runs of one commit apart."""
    import torch

    state = _process_code_state()
    tags = {
        "mlflow.source.git.commit": state.commit or "unknown (no checkout, no build record)",
        "imf.git_dirty": str(state.dirty).lower() if state.commit else "unknown",
        "imf.code_source": state.source,
        "imf.lock_sha256": state.lock_sha256 or sha256_of(LOCK) or "no requirements.lock",
        "imf.torch": torch.__version__,
        "imf.package_version": package_version(),
        METHOD_TAG: str(code_record()["method"]),
        "imf.cuda": torch.version.cuda or "none",
    }
    if state.dirty:
        shown = ", ".join(state.changed[:20]) + (" ..." if len(state.changed) > 20 else "")
        tags |= {"imf.git_diff_sha256": state.diff_sha256, "imf.git_changed": shown}
    if device is not None:
        tags["imf.device"] = device if isinstance(device, str) else device_name(device)
    return tags


def require_clean_tree(repo: Path = REPO) -> None:
    """A paper-scale sweep records which code produced its numbers: refuse uncommitted changes
    (they would not be in the commit its runs name), naming the files, and code whose commit
    nobody recorded."""
    state = installed_code_state(repo)
    if not state.commit:
        raise ValueError(
            "the code's commit is unknown (not a git checkout, and the package has no build "
            "record): install a package built from a git checkout (the image: docker build "
            "--build-arg IMF_BUILD_COMMIT=$(git rev-parse HEAD)), or pass --allow-dirty"
        )
    if state.dirty:
        files = ", ".join(state.changed[:10]) + (" ..." if len(state.changed) > 10 else "")
        raise ValueError(
            f"the code has changes not committed ({files}): commit them, so that the runs' "
            "commit names the code that made them, or pass --allow-dirty (the runs then record "
            "a hash of the difference)"
        )
