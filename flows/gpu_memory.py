"""What fits on a GPU: a training's per-GPU batch against the largest that fit on the GPU check.

    >>> per_gpu_memory(cfg, Rates.of("h200"))  # "per GPU: batch B, ~G GiB of M: N fit on ..."
    >>> check_gpu_memory(configs)  # the refusal alone, before a run or a sweep starts

A per-GPU batch over the largest that fit is refused (ConfigError) with the train.micro_batch that
would fit; the plan (flows.plan) prints the expected memory of each GPU training.
"""

from __future__ import annotations

import dataclasses

from flows.gpu_rates import CHECKED_PRESETS, Rates
from imf_core.models import build, count_params, preset


def checked_label(cfg) -> str | None:
    """The GPU check's label of the config's model: a preset it measures, unchanged."""
    from tasks.train import MODEL_RUNTIME_ONLY

    label = CHECKED_PRESETS.get(cfg.model.name)
    runtime = {k: getattr(preset(cfg.model.name), k) for k in MODEL_RUNTIME_ONLY} if label else {}
    if label and dataclasses.replace(cfg.model_config(), **runtime) == preset(cfg.model.name):
        return label
    return None


def largest_fitting(rates: Rates, label: str, adam_gib: float) -> tuple[int | None, dict, str]:
    """(the largest per-GPU batch of `label` that fit, {batch: peak GiB of a steady-state step},
    how the figures were taken). Checks before 2026-12-06 measured a first step, before AdamW's
    state: their peaks get that state added, and a timed step's out-of-memory caps the batch."""
    search = rates.max_batch[label]
    probes = {int(b): gib for b, gib in search["probes"].items() if gib != "oom"}
    largest = search["largest_fitting"]
    if search.get("after_optimizer_step"):
        return largest, probes, "a steady-state step"
    probes = {b: gib + adam_gib for b, gib in probes.items()}
    how = f"a first step + {adam_gib:.1f} GiB of AdamW state"
    oom = rates.timed_oom.get(label)
    if oom is not None and largest is not None and largest >= oom:
        largest = max((b for b in probes if b < oom), default=None)
        how += f"; a timed step ran out of memory at {oom}"
    return largest, probes, how


def expected_gib(probes: dict[int, float], batch: int) -> float:
    """Peak memory at `batch`, linear through the two nearest probes (memory is the weights'
    and optimizer's share plus the activations' share, proportional to the batch)."""
    points = sorted(probes, key=lambda b: (abs(b - batch), b))[:2]
    if len(points) == 1:
        return probes[points[0]] * batch / points[0]
    (b0, b1) = sorted(points)
    return probes[b0] + (probes[b1] - probes[b0]) * (batch - b0) / (b1 - b0)


def per_gpu_memory(cfg, rates: Rates | None) -> str:
    """What a GPU training holds per GPU, from the GPU check's largest-batch search ("" without
    train.use_gpu). Refuses (ConfigError) a per-GPU batch over the largest that fit there."""
    import torch

    from tasks.config import ConfigError

    t = cfg.train
    if not t.use_gpu:
        return ""
    per_worker = t.batch_size // t.num_workers
    batch = min(t.micro_batch or per_worker, per_worker)
    steps = f" (train.micro_batch: {per_worker // batch} micro-steps)" if batch < per_worker else ""
    line = f"per GPU: batch {batch}{steps}"
    label = checked_label(cfg)
    if rates is None or not rates.max_batch:
        return f"{line}; no GPU check on record to check its memory against"
    if label not in rates.max_batch:
        what = label or f"{cfg.model.name} as configured"
        return f"{line}; the GPU check ({rates.source}) has no figure for {what}"
    with torch.device("meta"):
        adam_gib = 8 * count_params(build(cfg.model_config()), inference=False) / 2**30
    largest, probes, how = largest_fitting(rates, label, adam_gib)
    where = f"the {rates.gpu} ({rates.source}; imf_aux, eager, bf16, {how})"
    if largest is None or batch > largest:
        fits = [d for d in range(1, per_worker + 1) if per_worker % d == 0 and d <= (largest or 0)]
        hint = f"set train.micro_batch={fits[-1]}" if fits else "no batch fit there"
        raise ConfigError(
            f"per-GPU batch {batch} of {label} is over the {largest or 0} that fit on {where}: "
            f"{hint}"
        )
    gib = expected_gib(probes, batch)
    return f"{line}, ~{gib:.0f} GiB of {rates.memory_gib:.0f}: {largest} fit on {where}"


def check_gpu_memory(configs, gpu: str = "") -> None:
    """per_gpu_memory's refusal for configs about to run, against the newest GPU check of `gpu`
    (default h200), without a plan: for the validation a command runs before it starts."""
    gpu_configs = [cfg for cfg in configs if cfg.train.use_gpu]
    if not gpu_configs:
        return
    try:
        rates = Rates.of(gpu or "h200")
    except LookupError:
        if gpu:
            raise
        return  # no GPU check on record: nothing to check against (the plan says so)
    for cfg in gpu_configs:
        per_gpu_memory(cfg, rates)
