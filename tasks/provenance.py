"""Where a run came from: the code's commit and any change not committed, the locked package
versions, torch, CUDA and the device; recorded as tags on every training and evaluation run.

    >>> provenance_tags()             # {"mlflow.source.git.commit": ..., "imf.git_dirty": ...}
    >>> require_clean_tree()          # paper-scale sweeps refuse uncommitted code
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"


@dataclass(frozen=True)
class CodeState:
    commit: str  # "" outside a git checkout
    changed: tuple[str, ...]  # modified, added, deleted or untracked (not ignored) paths
    diff_sha256: str  # of `git diff HEAD` and the untracked files' names and bytes

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


@functools.cache
def _process_code_state() -> CodeState:
    """The code this process runs: read once, at its first run (later edits are not its code)."""
    return code_state()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def device_name(device) -> str:
    """ "cpu", or the CUDA device's name ("cuda: NVIDIA H200")."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def provenance_tags(device=None) -> dict[str, str]:
    """MLflow tags of where a run came from. `mlflow.source.git.commit` is the one MLflow's UI
    shows as the run's commit; the diff hash tells two dirty runs of one commit apart."""
    import torch

    state = _process_code_state()
    tags = {
        "mlflow.source.git.commit": state.commit or "unknown (not a git checkout)",
        "imf.git_dirty": str(state.dirty).lower(),
        "imf.lock_sha256": sha256_of(LOCK) or "no requirements.lock",
        "imf.torch": torch.__version__,
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
    (they would not be in the commit its runs name), naming the files."""
    state = code_state(repo)
    if state.dirty:
        files = ", ".join(state.changed[:10]) + (" ..." if len(state.changed) > 10 else "")
        raise ValueError(
            f"the code has changes not committed ({files}): commit them, so that the runs' "
            "commit names the code that made them, or pass --allow-dirty (the runs then record "
            "a hash of the difference)"
        )
