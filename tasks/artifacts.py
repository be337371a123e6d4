"""Content-addressed stage outputs: keys and the `_SUCCESS` manifest (the files themselves are
read and written through tasks.storage).

A stage's output lives in `<artifacts>/<stage>/<key>/`, where `key` hashes the stage's config
slice and its input keys. The output counts as done only when it holds `_SUCCESS`: a JSON
manifest with the key, config, input keys, every file's size and SHA-256, the code that made it
(package version, commit, imf_core's method version) and timings. This, not any orchestrator
cache, is the source of truth for "already computed".

The content key covers what an output is computed from, not the code's numerics: a training
made by an earlier method version keeps its key and is reused, and said to be stale (`begin`),
unless the launch asks to recompute stale outputs (`paths.recompute_stale`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.storage import Output

SUCCESS = "_SUCCESS"
CODE_FILE = "_CODE.json"  # an unfinished output's code: the method versions that worked on it
# The stages whose numbers are imf_core's, which another method version makes stale (begin);
# precompute's are the tokenizer's and the data's.
METHOD_STAGES = ("train", "evaluate")
# Bumped whenever a stage's output format or semantics change, so old outputs are not reused.
CODE_VERSION = "2"  # 2: official token order, init, class-drop rows, uint8 rounding


def content_key(stage: str, config: Any, input_keys: list[str] | None = None) -> str:
    """A short stable hash of a stage's config slice (any JSON-able value) and its inputs."""
    payload = json.dumps(
        {
            "stage": stage,
            "config": config,
            "inputs": sorted(input_keys or []),
            "code": CODE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class FileRecord:
    name: str
    bytes: int
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, out: Output, name: str, **meta: Any) -> FileRecord:
        """The record of the file `name` (e.g. "units/cfg1.npz") of `out`."""
        return cls(name, out.size(name), out.sha256(name), meta)

    def valid_in(self, out: Output, verify: str = "sha256") -> bool:
        """True when the file exists with this size (and, with verify="sha256", this checksum)."""
        if not out.exists(self.name) or out.size(self.name) != self.bytes:
            return False
        return verify != "sha256" or out.sha256(self.name) == self.sha256


@dataclass
class Manifest:
    key: str
    stage: str
    config: Any
    input_keys: list[str]
    files: list[FileRecord]
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    code_version: str = CODE_VERSION
    created: float = field(default_factory=time.time)
    code: dict[str, Any] = field(default_factory=dict)  # {} read back: made before it was kept

    def write(self, out: Output) -> None:
        """Publishes `out` as finished: the manifest is written last, whole."""
        if not self.code:  # the code that began (and perhaps resumed) it, and this code
            self.code = code_of(out)
        out.write_json(SUCCESS, self.__dict__ | {"files": [f.__dict__ for f in self.files]})

    @classmethod
    def read(cls, out: Output) -> Manifest | None:
        """The manifest of a finished stage output, or None when it has none."""
        if not out.exists(SUCCESS):
            return None
        obj = out.read_json(SUCCESS)
        obj["files"] = [FileRecord(**f) for f in obj["files"]]
        return cls(**obj)


def require_manifest(out: Output) -> Manifest:
    """The manifest, or a clear error naming a location that is not a finished stage output."""
    manifest = Manifest.read(out)
    if manifest is None:
        raise FileNotFoundError(
            f"{out.uri} has no {SUCCESS}: it is not a finished stage output "
            "(missing, interrupted, or not made by this pipeline)"
        )
    return manifest


def code_of(out: Output) -> dict[str, Any]:
    """This code's record (tasks.provenance.code_record) with every method version that has
    worked on `out` (its _CODE.json: a resume may cross versions)."""
    from imf_core import METHOD_VERSION
    from tasks.provenance import code_record

    earlier = out.read_json(CODE_FILE)["methods"] if out.exists(CODE_FILE) else []
    return code_record() | {"methods": sorted({*earlier, METHOD_VERSION}, key=str)}


def methods_of(out: Output) -> list | None:
    """The method versions that made `out` (None: not yet recorded), from its manifest, else
    from the _CODE.json of an unfinished one; None when nothing is there."""
    manifest = Manifest.read(out)
    if manifest is not None:
        return manifest.code.get("methods", [None])
    if out.exists(CODE_FILE):
        return out.read_json(CODE_FILE)["methods"]
    if out.exists():
        return [None]  # begun by code that recorded nothing
    return None


def versions_text(methods: list | None) -> str:
    """ "2", "2,3" (a resume crossed versions) or "unrecorded"."""
    return ",".join("unrecorded" if m is None else str(m) for m in methods or [None])


def stale(methods: list | None) -> str:
    """Why numbers made by `methods` are not this code's ("" when they are)."""
    from imf_core import METHOD_VERSION

    others = sorted({m for m in methods or [] if m != METHOD_VERSION}, key=str)
    if not others:
        return ""
    made = "made " + ("partly " if METHOD_VERSION in methods else "")
    if None in others:
        made += "before method versions were recorded"
    else:
        made += "by method version " + ", ".join(str(m) for m in others)
    return f"{made} (this code: {METHOD_VERSION}; imf_core.METHOD_HISTORY)"


def begin(
    out: Output,
    what: str,
    recompute_stale: bool,
    made_from: Output | None = None,
    say: Callable[[str], None] = print,
) -> str:
    """Before a stage reuses, resumes or starts `out` (holding its output_lock): whether what
    is there was made by another method version, or, finished, before the output it was made
    from (`made_from`, e.g. a training recomputed since). Such an output is moved aside to
    `<artifacts>/stale/` with `recompute_stale` (kept, not deleted), so the stage computes it
    afresh; else it is reused or resumed and said to be stale, on the terminal and in the
    return value (the stage's result, its MLflow run and the sweep report carry it). Then the
    unfinished output records that this code works on it (CODE_FILE)."""
    reason = stale(methods_of(out))
    done = Manifest.read(out)
    source = Manifest.read(made_from) if made_from is not None else None
    if done is not None and source is not None and source.created > done.created:
        reason = reason or f"made from an earlier {source.stage} output (recomputed since)"
    if reason and recompute_stale:
        aside = out.store.output("stale", out.stage, f"{out.name}-{time.time():.0f}")
        out.move_to(aside)
        say(f"{what} {out.name}: {reason}: recomputing it (the old output moved to {aside.uri})")
        reason = ""
    elif reason:
        verb = "reusing it" if done is not None else "resuming it, mixing versions"
        say(f"{what} {out.name}: {reason}: {verb} (--recompute-stale recomputes it)")
    if Manifest.read(out) is None:
        out.make()
        out.write_json(CODE_FILE, {"methods": code_of(out)["methods"]})
    return reason


def cache_key_of(output_dir: Callable[..., Output]) -> Callable[[Any, dict], str | None]:
    """A Prefect `cache_key_fn` for a stage task: `<stage>-<content key>-<instance>` while
    the stage's output (`output_dir(**task parameters)`) holds a `_SUCCESS` whose
    files are all present at their recorded sizes, made by this method version from inputs
    that are not stale nor newer than it; else None, and the task runs (the stage
    function then decides, down to the shard or unit, what to reuse). Prefect's cache sits on
    top of the manifests; it never replaces them."""

    def key_fn(context: Any, parameters: dict) -> str | None:
        out = output_dir(**parameters)
        done = Manifest.read(out)
        if done is None or not all(f.valid_in(out, "size") for f in done.files):
            return None
        # Stale, or made from a stale or since-recomputed input: the stage says so (begin)
        # or recomputes it, so its body must run.
        if done.stage in METHOD_STAGES and stale(done.code.get("methods", [None])):
            return None
        inputs = [p for p in parameters.values() if hasattr(p, "path")]
        if any(getattr(p, "stale", "") for p in inputs):
            return None
        made = [Manifest.read(Output.at(p.path)) for p in inputs]
        if any(m is not None and m.created > done.created for m in made):
            return None
        # The location and the manifest's creation time are part of the key: the same content
        # key under another artifact root, or recomputed after a deletion, is another output,
        # and a cache record must never hand back a path or run id of a different one.
        instance = f"{out.uri}|{done.created}"
        return f"{done.stage}-{done.key}-{hashlib.sha256(instance.encode()).hexdigest()[:8]}"

    return key_fn


class StageTask:
    """A stage as the Prefect task the flows call: cached by content key while `_SUCCESS`
    stands (`cache_key_of`), its state "Reused" when the stage found its output (`reported`).
    Built on first use: every Ray worker (a trainer, an evaluation actor) imports the stage
    modules for their functions and configs and has no use for Prefect, whose import cost each
    of them ~0.7 s of CPU."""

    def __init__(self, stage: Callable[..., Any], name: str, output_dir: Callable[..., Output]):
        self.stage, self.name, self.output_dir = stage, name, output_dir

    @functools.cached_property
    def task(self) -> Any:
        from prefect import task

        body = reported(self.stage)
        key = cache_key_of(self.output_dir)
        return task(body, name=self.name, cache_key_fn=key, persist_result=True)

    def with_options(self, **options: Any) -> Any:
        return self.task.with_options(**options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)


def reported(stage: Callable[..., Any]) -> Callable[..., Any]:
    """A stage as a Prefect task body whose state says "Reused" (not a bare "Completed" in a
    few ms) when the stage found its output complete; `.result()` is the stage's result."""
    from prefect.states import Completed

    @functools.wraps(stage)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = stage(*args, **kwargs)
        if getattr(result, "computed", True):
            return result
        return Completed(data=result, name="Reused", message=f"reused {result.out.uri}")

    return run
