"""The published input files and their SHA-256 (KNOWN_FILES), and a file checked against them
(check_digest), for the checks of tasks.input_checks. A file is hashed once per process for
each (path, size, mtime)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownFile:
    """A published file: where it comes from and its SHA-256."""

    role: str  # inception | sd_vae:mse | sd_vae:ema | reference
    name: str  # its name at the source
    url: str
    sha256: str
    recorded_by: str  # where the digest was read
    resolution: int = 0  # a reference's image side


# The one table of published digests. Left out, because no stored reference records them (a
# file without an entry is reported "digest not known", never refused for it):
# - sd-vae-ft-mse diffusion_pytorch_model.safetensors (diffusers loads it before the .bin)
# - sd-vae-ft-ema, either file (only a third party's copy was found, not Stability's own)
# - ADM's VIRTUAL_imagenet256_labeled.npz (its images, arr_0, record its resolution instead)
# - the iMF release checkpoints (iMF-B-2.pth ... iMF-XL-2.pth)
KNOWN_FILES: tuple[KnownFile, ...] = (
    KnownFile(
        "sd_vae:mse",
        "diffusion_pytorch_model.bin",
        "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/"
        "31f26fdeee1355a5c34592e401dd41e45d25a493/diffusion_pytorch_model.bin",
        "1b4889b6b1d4ce7ae320a02dedaeff1780ad77d415ea0d744b476155c6377ddc",
        "the Git LFS pointer (334,707,217 bytes), pinned alike by several projects",
    ),
    KnownFile(
        "inception",
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        "one project's record; its first 8 digits are the hash in the file's name",
    ),
    # JiT's statistics (the iMF PyTorch evaluation's reference): mu and sigma only, so the
    # digest is what tells their resolution
    KnownFile(
        "reference",
        "jit_in256_stats.npz",
        "https://github.com/LTH14/JiT/raw/main/fid_stats/jit_in256_stats.npz",
        "412046720c0d496dc6d72a30eac3e22b9ef6ddac3501cce7f996674ad227ba4c",
        "two projects' records alike",
        resolution=256,
    ),
    KnownFile(
        "reference",
        "jit_in512_stats.npz",
        "https://github.com/LTH14/JiT/raw/main/fid_stats/jit_in512_stats.npz",
        "cdd15b54f9d1f26a881fcdc920a3410fa7a934047d6c4f5b8395b87182a9ab42",
        "one project's record",
        resolution=512,
    ),
)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: the memo's key
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def known_by_digest(digest: str) -> KnownFile | None:
    return next((k for k in KNOWN_FILES if k.sha256 == digest), None)


def check_digest(path: Path, role: str, published: bool) -> tuple[str, str]:
    """(problem, note) for a file against the known digests of `role`: another role's file,
    a known name with other bytes, or (published) bytes that are not the published file's."""
    expected = [k for k in KNOWN_FILES if k.role == role]
    by_name = [k for k in expected if k.name == path.name]
    if not expected:
        return "", "SHA-256 not verified (no published digest known)"
    digest = sha256_of(path)
    found = known_by_digest(digest)
    if found is not None and found.role == role:
        return "", f"SHA-256 is the published {found.name}'s"
    if found is not None:
        return f"this is the published {found.role} file {found.name}, not {role}", ""
    if by_name or published:
        want = by_name[0] if by_name else expected[0]
        return (
            f"SHA-256 {digest[:12]}... is not the published {want.name}'s "
            f"({want.sha256[:12]}..., from {want.url})",
            "",
        )
    return "", f"not the published file (SHA-256 {digest[:12]}...): FIDs not comparable"
