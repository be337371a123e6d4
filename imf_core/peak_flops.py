"""Datasheet dense bf16 peaks: the denominator of MFU as PaLM, Megatron and torchtitan count it.

MFU = useful model FLOPs per second / the GPU's datasheet dense (not sparse) bf16 peak. A
measured matmul rate is reported beside it, never as its denominator: it moves ±3 % run to
run and hides how far a kernel is from what the hardware is sold at.

    >>> datasheet_peak("NVIDIA H200")
    ('H200 SXM', 989.4)
    >>> mfu(400e9 * 820, 989.4)   # 820 img/s at 400 GFLOP per image
    0.3315...
"""

from __future__ import annotations

# (substring of torch.cuda.get_device_name(), lower case; the GPU's name; TFLOP/s). Checked in
# order, so the specific form factors (PCIe, NVL) come before the plain name, which is SXM.
# Dense bf16 from NVIDIA's datasheets (the "with sparsity" figures are twice these).
DATASHEET_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("h100 pcie", "H100 PCIe", 756.0),
    ("h100 nvl", "H100 NVL", 835.5),
    ("h100", "H100 SXM", 989.4),
    ("h200 nvl", "H200 NVL", 835.5),
    ("gh200", "GH200", 989.4),
    ("h200", "H200 SXM", 989.4),
    ("a100", "A100", 312.0),
    ("l40s", "L40S", 362.05),
    ("l40", "L40", 181.05),  # before "l4", which its name holds
    ("a10g", "A10G", 70.0),
    ("l4", "L4", 121.0),
    ("b200", "B200", 2250.0),
)


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    """(the GPU's datasheet name, its dense bf16 peak in TFLOP/s) for a device name such as
    torch.cuda.get_device_name() gives ("NVIDIA H100 80GB HBM3"); None for a device not in the
    table (a CPU, an unknown GPU): its MFU cannot be stated, and callers say so."""
    name = device_name.lower()
    for key, label, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return label, tflops
    return None


def peak_basis(device_name: str) -> str:
    """What MFU on this device divides by, in words, for a report or a run's tag:
    "H200 SXM 989.4 TFLOP/s bf16 (datasheet)", or "none: no datasheet peak for cpu"."""
    peak = datasheet_peak(device_name)
    if peak is None:
        return f"none: no datasheet peak for {device_name}"
    return f"{peak[0]} {peak[1]:g} TFLOP/s bf16 (datasheet)"


def mfu(flops_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: useful FLOPs per second over the peak (TFLOP/s)."""
    return flops_per_s / (peak_tflops * 1e12)
