"""The paper-scale inputs checked before any work (tasks.inputs, `imf check`), on small stand-ins:
ImageNet as 3 synset-named classes of 2 images, the published digests as those of stand-in
bytes. Each wrong input is refused by the command that reads it, in one line naming the key,
before an artifact directory exists."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from paper_inputs import (
    INCEPTION_BYTES,
    VAE_BYTES,
    digest,
    make_paper_inputs,
    scale_expectations,
    write_reference,
)

from flows.cli import main
from tasks import input_digests
from tasks.config import load_config
from tasks.input_checks import SD_VAE_CONFIG
from tasks.input_digests import KnownFile
from tasks.inputs import check_inputs


@pytest.fixture
def paper(tmp_path, monkeypatch):
    """The stand-in files, the expectations scaled to them, and the overrides naming them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    scale_expectations(monkeypatch)
    return make_paper_inputs(tmp_path / "inputs")


def overrides(files: dict[str, Path]) -> list[str]:
    return [f"{key}={path}" for key, path in files.items()]


def refused(argv: list[str], key: str, capsys) -> str:
    """The command's one-line refusal, which names `key`, with no artifact written."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"(set {key})" in err and len(err.strip().splitlines()) == 1
    assert not Path("artifacts").exists()
    return err


def test_a_good_set_passes_every_check(paper, capsys):
    cfg = load_config("imagenet_b2", overrides(paper))
    findings = check_inputs(cfg, full=True)
    assert [f.key for f in findings] == list(paper)  # one line per input, in this order
    assert all(f.ok for f in findings), [f.line() for f in findings]
    assert main(["check", "-e", "imagenet_b2", *overrides(paper)]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 6 images, 3 sampled images decode" in out
    assert "SHA-256 is the published w.pth's" in out
    assert "2 images of 256 x 256" in out


def test_a_missing_class_folder_or_a_non_synset_name_is_refused_before_precompute(paper, capsys):
    train = paper["data.root"]
    (train / "n00000002" / "img0.JPEG").rename(train / "cat")  # a stray folder among classes
    (train / "cat").unlink()
    (train / "cat").mkdir()
    argv = ["precompute", "-e", "imagenet_b2", *overrides(paper)]
    assert "not named by synset ids (e.g. ['cat'])" in refused(argv, "data.root", capsys)
    (train / "cat").rmdir()
    for image in (train / "n00000002").iterdir():
        image.unlink()
    (train / "n00000002").rmdir()
    assert "2 class folders, imagenet1k has 3" in refused(argv, "data.root", capsys)


def test_an_incomplete_copy_is_refused_by_its_image_count(paper, capsys):
    (paper["data.root"] / "n00000001" / "img1.JPEG").unlink()
    argv = ["train", "-e", "imagenet_b2", *overrides(paper)]
    assert "5 images, imagenet1k has 6" in refused(argv, "data.root", capsys)


def test_a_wrong_inception_digest_is_refused_before_evaluation(paper, capsys):
    paper["eval.inception_weights"].write_bytes(b"other inception weights")
    argv = ["evaluate", "-e", "imagenet_b2", *overrides(paper)]
    err = refused(argv, "eval.inception_weights", capsys)
    assert f"not the published w.pth's ({digest(INCEPTION_BYTES)[:12]}..." in err


def test_off_paper_scale_other_weights_pass_with_a_note(paper):
    """A test's random Inception weights are fine where published files are not asked for."""
    paper["eval.inception_weights"].write_bytes(b"random weights")
    cfg = load_config("imagenet_b2", [*overrides(paper), "inputs.published=false"])
    (inception,) = [f for f in check_inputs(cfg) if f.key == "eval.inception_weights"]
    assert inception.ok and "FIDs not comparable" in inception.note


def test_the_other_vae_variant_and_another_architecture_are_refused(paper, capsys):
    vae = paper["tokenizer.path"]
    (vae / "diffusion_pytorch_model.bin").write_bytes(VAE_BYTES["ema"])
    argv = ["precompute", "-e", "imagenet_b2", *overrides(paper)]
    err = refused(argv, "tokenizer.path", capsys)
    assert "this is the published sd_vae:ema file" in err and "tokenizer.variant" in err
    # the same folder is right for the experiment that names ft-EMA
    cfg = load_config("imagenet_b2", [*overrides(paper), "tokenizer.variant=ema"])
    assert all(f.ok for f in check_inputs(cfg))
    (vae / "diffusion_pytorch_model.bin").write_bytes(VAE_BYTES["mse"])
    (vae / "config.json").write_text(json.dumps(SD_VAE_CONFIG | {"latent_channels": 16}))
    assert "'latent_channels': 16" in refused(argv, "tokenizer.path", capsys)


def test_a_truncated_or_misshapen_reference_is_refused_before_evaluation(paper, capsys):
    reference = paper["eval.reference"]
    argv = ["evaluate", "-e", "imagenet_b2", *overrides(paper)]
    whole = reference.read_bytes()
    reference.write_bytes(whole[: len(whole) // 2])
    assert "is not a readable npz (truncated?)" in refused(argv, "eval.reference", capsys)
    write_reference(reference, dim=64, images=None)
    assert "inception features need (2048,) and (2048, 2048)" in refused(
        argv, "eval.reference", capsys
    )
    write_reference(reference, images=(2, 512, 512, 3))
    assert "(a reference of another resolution)" in refused(argv, "eval.reference", capsys)


def test_an_undecodable_image_is_found_by_imf_check_not_by_the_preflight(paper, capsys):
    """The preflight counts files (cheap); `imf check` also decodes a sample."""
    (paper["data.root"] / "n00000000" / "img0.JPEG").write_bytes(b"not a JPEG")
    cfg = load_config("imagenet_b2", overrides(paper))
    assert all(f.ok for f in check_inputs(cfg))
    assert main(["check", "-e", "imagenet_b2", *overrides(paper)]) == 1
    assert "FAIL  image folder (imagenet1k)" in capsys.readouterr().out


def test_each_published_digest_names_its_source():
    for known in input_digests.KNOWN_FILES:
        assert re.fullmatch(r"[0-9a-f]{64}", known.sha256) and known.url.startswith("https://")
        # a torch.hub file name carries the first 8 hex digits of its SHA-256
        hub_hash = re.search(r"-([0-9a-f]{8})\.pth$", known.name)
        assert hub_hash is None or known.sha256.startswith(hub_hash.group(1))


def test_a_reference_that_its_digest_names_of_another_resolution_is_refused(
    paper, capsys, monkeypatch
):
    """JiT's files hold only mu and sigma: their digest is what tells 256 from 512."""
    reference = paper["eval.reference"]
    write_reference(reference, images=None)
    jit512 = KnownFile("reference", "jit_in512_stats.npz", "u", digest(reference.read_bytes()), "")
    monkeypatch.setattr(
        input_digests, "KNOWN_FILES", (*input_digests.KNOWN_FILES, replace(jit512, resolution=512))
    )
    argv = ["evaluate", "-e", "imagenet_b2", *overrides(paper)]
    err = refused(argv, "eval.reference", capsys)
    assert "this is jit_in512_stats.npz, the 512 x 512 reference" in err


def test_imf_check_reads_a_checkpoints_architecture_against_the_data(paper, capsys):
    """A release-format file of 10 classes is not an ImageNet model (of 3 stand-in classes)."""
    import torch

    from imf_core.models import create
    from imf_core.models.official import to_official

    for classes, code in ((10, 1), (3, 0)):
        model = create("tiny", num_classes=classes, in_channels=4)
        torch.save(to_official(model), paper["data.root"].parent / "iMF-tiny.pth")
        argv = ["check", "-e", "imagenet_b2", *overrides(paper)]
        argv += [f"eval.checkpoint={paper['data.root'].parent / 'iMF-tiny.pth'}"]
        assert main(argv) == code
        line = next(x for x in capsys.readouterr().out.splitlines() if "checkpoint" in x)
        assert ("{'num_classes': 10}" in line) == (code == 1)
        assert ("3 classes" in line) == (code == 0)


def test_the_schema_names_the_datasets_the_checker_describes():
    from tasks.input_checks import DATASETS
    from tasks.schema import INPUT_DATASETS

    assert set(DATASETS) == set(INPUT_DATASETS)
