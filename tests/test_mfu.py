"""MFU as the field counts it (issue 35): useful FLOPs per second over the datasheet dense bf16
peak of the GPU the device names; no MFU for a device without one. The plan's restatement of
recorded MFUs is tested in tests/test_flows.py."""

import pytest

from imf_core.peak_flops import datasheet_peak, mfu
from tasks.config import load_config
from tasks.precompute import PrecomputeResult
from tasks.train import TrainJob
from tasks.train_loop import RankZeroLogger, Utilisation, flops_per_image


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("NVIDIA H200", ("H200 SXM", 989.4)),
        ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.4)),
        ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
        ("NVIDIA A100-SXM4-80GB", ("A100", 312.0)),
        ("NVIDIA L40S", ("L40S", 362.05)),
        ("NVIDIA L40", ("L40", 181.05)),  # not the L4's 121: "l4" is in its name
        ("NVIDIA L4", ("L4", 121.0)),
        ("NVIDIA GH200 480GB", ("GH200", 989.4)),
        ("cpu", None),
        ("NVIDIA Tesla V100-SXM2-16GB", None),
    ],
)
def test_the_datasheet_peak_is_the_named_gpus_dense_bf16_one(device, expected):
    assert datasheet_peak(device) == expected


def test_mfu_is_flops_per_second_over_the_peak():
    assert mfu(989.4e12 / 2, 989.4) == pytest.approx(0.5)
    # The recorded compiled B/2 imf_aux step: 827.7 images/s at 401.45 useful GFLOP each.
    assert mfu(827.7 * 401.45e9, 989.4) == pytest.approx(0.336, abs=5e-4)


@pytest.fixture(scope="module")
def smoke():
    return load_config("smoke", [])


def test_the_trainings_mfu_is_useful_flops_over_the_world_times_the_datasheet_peak(smoke):
    per_image = flops_per_image(smoke.model_config(), smoke.objective, smoke.guidance)
    assert per_image > 0
    h200 = Utilisation.of(per_image, "NVIDIA H200", world=8)
    assert h200.flops_per_image == per_image
    samples_per_s = 1e4
    assert h200.mfu(samples_per_s) == pytest.approx(samples_per_s * per_image / (8 * 989.4e12))
    assert h200.basis() == "H200 SXM 989.4 TFLOP/s bf16 (datasheet)"
    cpu = Utilisation.of(per_image, "cpu", world=1)
    assert cpu.mfu(samples_per_s) is None and cpu.basis() == "none: no datasheet peak for cpu"
    v100 = Utilisation.of(per_image, "Tesla V100-SXM2-16GB", world=1)
    assert v100.mfu(samples_per_s) is None
    assert v100.basis() == "none: no datasheet peak for Tesla V100-SXM2-16GB"


class Journal:
    """RunJournal's interface, kept in memory (no tracking server, no thread)."""

    def __init__(self, uri, run_id, path):
        self.metrics_at, self.tag_values = {}, {}

    def metrics(self, values, step, group="train"):
        self.metrics_at[step] = values
        return True

    def tags(self, values):
        self.tag_values |= values


class Optimizer:
    param_groups = [{"lr": 1e-4}]


@pytest.mark.parametrize("device", ["NVIDIA H200", "cpu", "NVIDIA Tesla V100-SXM2-16GB"])
def test_the_training_log_shows_mfu_beside_its_rate_where_the_gpu_has_a_peak(
    smoke, device, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr("tasks.train_loop.RunJournal", Journal)
    cfg = load_config("smoke", ["train.eval_every=0", f"paths.artifacts={tmp_path}"])
    job = TrainJob.of(cfg, PrecomputeResult(tmp_path, "0" * 16, False, [], 0, []))
    per_image = flops_per_image(job.model, job.objective, job.guidance)
    utilisation = Utilisation.of(per_image, device, world=2)
    logger = RankZeroLogger(job, "run", None, 100, utilisation)
    # 10 steps in 2 s at the smoke batch: 5 it/s
    monkeypatch.setattr("tasks.train_loop.time.perf_counter", lambda: 12.0)
    logger.step(10, {"loss": 1.0, "mse_u": 0.5}, Optimizer(), start=10.0, start_step=0)
    text = capsys.readouterr().out
    logged = logger.run.metrics_at[10]
    assert logged["train/steps_per_s"] == pytest.approx(5.0)
    assert logger.run.tag_values == {"imf.mfu_peak": utilisation.basis()}
    if device == "NVIDIA H200":
        expected = 5.0 * smoke.train.batch_size * utilisation.flops_per_image / (2 * 989.4e12)
        assert logged["train/mfu"] == pytest.approx(expected)
        assert f"5.00 it/s  MFU {100 * expected:.1f} %  eta" in text
        assert "MFU over H200 SXM 989.4 TFLOP/s bf16 (datasheet)" in text
    else:  # no MFU metric, and no figure in its place
        assert "train/mfu" not in logged
        assert "5.00 it/s  eta" in text and "MFU over none: no datasheet peak for" in text
