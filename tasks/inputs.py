"""The experiment's input files, checked before any work: `imf check -e EXP` and the preflight
every command runs (tasks.eval_inputs.preflight).

    >>> findings = check_inputs(cfg, full=True)   # one Finding per input the config names
    >>> print(report(findings))                    # a line each: what, path, ok or what is wrong
    >>> require_inputs(cfg, reads_of(cfg))         # the preflight: raises with the failing lines

Inputs: the image folder (`data.root`: class folders, their names and the image count that
`inputs.dataset` names; `imf check` also decodes a sample), the SD-VAE folder
(`tokenizer.path`: a diffusers AutoencoderKL of SD-VAE's architecture; weights compared with
the published digests), the Inception weights (`eval.inception_weights`), the FID reference
(`eval.reference`: mu (d,), sigma (d, d), the resolution of its images when it holds them) and
given weights (`eval.checkpoint`).

Cost: the preflight hashes the files a published digest is known for (the SD-VAE and Inception
weights, ~0.4 GB, ~1 s) and the FID reference (JiT's 33 MB; ADM's batch, ~2 GB with its images,
a few seconds: evaluation hashes it for its key anyway), memoised per process by (path, size,
mtime), so a sweep's variants hash each file once; the checkpoint is hashed by evaluation
(no published digest), and the image sample is decoded only by `imf check`.

Each file's check: tasks.input_checks; the published digests: tasks.input_digests.KNOWN_FILES.
"""

from __future__ import annotations

from collections.abc import Collection

from tasks.input_checks import (
    DATASETS,
    Finding,
    check_checkpoint,
    check_image_folder,
    check_inception,
    check_reference,
    check_vae,
)

SAMPLE_IMAGES = 16  # decoded by `imf check`, one from each of as many classes


def report(findings: list[Finding]) -> str:
    return "\n".join(f.line() for f in findings)


# ------------------------------------------------------------------ what a command reads
ALL = ("data", "tokenizer", "inception", "reference", "checkpoint")


def reads_of(cfg, stages: Collection[str] = ("precompute", "train", "evaluate")) -> set[str]:
    """The inputs the given stages read: precompute the images (and the VAE), training the
    evaluation's files when it evaluates during training, evaluation its files, and the images
    too unless given weights are evaluated against a given reference."""
    from tasks.eval_inputs import feature_kind, needs_precompute

    reads = set()
    evaluates = "evaluate" in stages or (
        "train" in stages and (cfg.train.eval_every or cfg.train.eval_every_epochs)
    )
    if "precompute" in stages or "train" in stages:
        reads |= {"data", "tokenizer"}
    if evaluates:
        reads |= {"tokenizer", "reference"}
        reads |= {"inception"} if feature_kind(cfg) == "inception" else set()
        reads |= {"checkpoint"} if cfg.eval.checkpoint else set()
        if not cfg.eval.checkpoint or needs_precompute(cfg):
            reads |= {"data"}
    return reads


def check_inputs(cfg, reads: Collection[str] = ALL, full: bool = False) -> list[Finding]:
    """One Finding per input the config names among `reads`; `full` decodes an image sample."""
    from tasks.eval_inputs import feature_kind

    inputs, findings = cfg.inputs, []
    if "data" in reads and cfg.data.name == "imagefolder":
        sample = SAMPLE_IMAGES if full else 0
        findings.append(check_image_folder(cfg.data.root, inputs.dataset, sample))
    tok = cfg.tokenizer
    if "tokenizer" in reads and tok.name == "sd_vae" and tok.path:
        findings.append(check_vae(tok.path, tok.variant, inputs.published))
    elif "tokenizer" in reads and tok.name == "sd_vae":
        hub = "no tokenizer.path: diffusers loads the hub id (its cache, or the network)"
        findings.append(Finding(f"SD-VAE ft-{tok.variant}", "(hub id)", "tokenizer.path", note=hub))
    if "inception" in reads and feature_kind(cfg) == "inception":
        findings.append(check_inception(cfg.eval.inception_weights, inputs.published))
    if "reference" in reads and cfg.eval.reference:
        kind = feature_kind(cfg)
        findings.append(check_reference(cfg.eval.reference, cfg.data.image_size, kind))
    if "checkpoint" in reads and cfg.eval.checkpoint:
        spec = DATASETS.get(inputs.dataset)
        expect = {"num_classes": spec.classes} if spec is not None else {}
        expect |= {"in_channels": 4} if tok.name == "sd_vae" else {}
        findings.append(check_checkpoint(cfg.eval.checkpoint, full, expect))
    return findings


def require_inputs(cfg, reads: Collection[str] = ALL) -> None:
    """The preflight's part: refuses, with every failing input's line, before any work.
    FileNotFoundError when each failure is a missing file, else ValueError."""
    failed = [f for f in check_inputs(cfg, reads) if not f.ok]
    if failed:
        kind = FileNotFoundError if all(f.missing for f in failed) else ValueError
        raise kind("; ".join(f"{f.what} {f.path}: {f.problem} (set {f.key})" for f in failed))
