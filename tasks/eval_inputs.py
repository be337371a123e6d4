"""What an evaluation reads, resolved from the experiment: its features, the FID reference,
given weights (`eval.checkpoint`); and the preflight every command runs, which checks every
stage's inputs (these among them) before any stage starts.

    >>> preflight(cfg)                      # the tracking server and every input file, or an error
    >>> features = Features.of(cfg, precompute_result)   # extractor and reference, checked
    >>> ref = load_reference(features.reference)          # mu, sigma
    >>> source = checkpoint_source(cfg)     # eval.checkpoint, checked and keyed by its bytes

Both evaluations read them here: `imf evaluate` (tasks.evaluate) and the evaluation during
training (tasks.inrun_eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.artifacts import content_key
from tasks.eval_classifier import makes_classifier
from tasks.features import check_weights
from tasks.precompute import PrecomputeResult
from tasks.storage import StoredFile, local_file, sha256_file


def feature_kind(cfg) -> str:
    """eval.features, with "auto" = the classifier when precompute trains one (pixel data)."""
    if cfg.eval.features != "auto":
        return cfg.eval.features
    return (
        "classifier" if makes_classifier(cfg.data, cfg.tokenizer, cfg.precompute) else "inception"
    )


def preflight(cfg) -> None:
    """What the stages will need -- the tracking server, the files -- checked before any stage
    starts (a clear error, not a failure after an hour of precompute and training): every input
    the pipeline reads (tasks.inputs; `imf check` also decodes an image sample)."""
    from tasks.inputs import reads_of, require_inputs
    from tasks.storage import Store
    from tasks.tracking import prepare

    Store.of(cfg.paths.artifacts).check()  # s3://: the endpoint, credentials and bucket
    prepare(cfg)
    require_inputs(cfg, reads_of(cfg))


def needs_precompute(cfg) -> bool:
    """Whether evaluating given weights needs the precompute stage's outputs: its classifier, or
    its reference statistics when eval.reference names none."""
    return feature_kind(cfg) == "classifier" or not cfg.eval.reference


def reference_path(cfg, pre: PrecomputeResult | None) -> Path | StoredFile:
    """eval.reference (absolute), else the precompute output's statistics."""
    if cfg.eval.reference:
        path = Path(cfg.eval.reference).resolve()
        found = path.is_file()
    else:
        path = pre.out.file("reference.npz")
        found = pre.out.exists(path.name)
    if not found:
        raise FileNotFoundError(f"no FID reference statistics at {path} (set eval.reference)")
    return path


@dataclass(frozen=True)
class Features:
    """What an evaluation's FID is computed with, resolved and checked once (Features.of):
    the feature extractor and its weights, the reference statistics' file and its bytes'
    hash (what an evaluation's key covers, not the path). The workers that read them run on
    other nodes and in other directories: precompute's files are StoredFiles, each read on
    the reader's node; a user's files are absolute paths, which every node must have."""

    kind: str  # inception | classifier
    extractor: Path | StoredFile  # its weights
    reference: Path | StoredFile  # the FID reference's npz (mu, sigma)
    reference_sha256: str

    @classmethod
    def of(cls, cfg, pre: PrecomputeResult | None) -> Features:
        """Raises FileNotFoundError or ValueError naming a missing or malformed file."""
        kind = feature_kind(cfg)
        if kind == "classifier":
            extractor = pre.out.file("classifier.pt")
            check_weights(kind, local_file(extractor))
        else:
            extractor = check_weights(kind, cfg.eval.inception_weights).resolve()
        reference = reference_path(cfg, pre)
        load_reference(reference)  # mu and sigma, shapes checked: a bad file fails now
        return cls(kind, extractor, reference, sha256_file(local_file(reference)))


def load_reference(path: Path | StoredFile):
    """The FID reference statistics (an npz with mu and sigma), or an error naming the file."""
    ref = np.load(local_file(path))
    if not {"mu", "sigma"} <= set(ref.files):
        raise ValueError(f"FID reference {path} has no mu and sigma (keys: {ref.files})")
    return ref


@dataclass
class Checkpoint:
    """Weights given to evaluate without training (eval.checkpoint), keyed by their bytes."""

    weights: Path
    key: str
    mlflow_run_id: str = ""  # no training run: the evaluation's run stands alone


def checkpoint_source(cfg) -> Checkpoint:
    """The file eval.checkpoint names, checked and hashed (an official .pth or ema.safetensors)."""
    path = Path(cfg.eval.checkpoint).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"eval.checkpoint {str(path)!r} is not a file")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(
            f"eval.checkpoint {path.name!r}: expected an official release .pth (or .pt) "
            "or one of our ema.safetensors"
        )
    return Checkpoint(path, content_key("checkpoint", {"sha256": sha256_file(path)}))
