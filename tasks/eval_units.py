"""The units both evaluations run (`imf evaluate`: tasks.evaluate; during training:
tasks.inrun_eval), and the runner that holds what they need.

    >>> runner = UnitRunner(weights, size, cfg.tokenizer, "inception", extractor, e, None, data)
    >>> name, sums = runner.run(Unit(2.0, (0.0, 1.0), shard=0, start=0, count=1000))

A unit is `count` samples from index `start` at one grid point: generate with the EMA weights
(imf_core.guidance.generate; sample i has class i mod K, so every class gets its share; noise
from (seed, i), the same at every grid point), decode through the tokenizer, convert to uint8
as the official PyTorch evaluation does (tasks.features.to_uint8), extract features, and reduce
them to float64 sums (n, sum x, sum xx^T; sum p, sum p log p for IS; correct labels) that merge
exactly into the single-pass metrics (tasks.eval_metrics). A "real" unit does the same with
training rows (the calibration's floor and class means). Units run in this process or on Ray
actors (run_units).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from imf_core.data import LatentDataset
from imf_core.guidance import generate, input_sensitivity
from imf_core.metrics import FeatureStats, ScoreStats
from imf_core.models import build
from imf_core.models.official import load_official
from imf_core.sdpa import plain_attention
from tasks.features import to_uint8
from tasks.grids import decoded_grid, grid_inputs, png_bytes, point_title
from tasks.storage import Output, StoredFile, local_file
from tasks.tokenizers import open_tokenizer, pick_device

# Noises and classes (i mod K) of the input-sensitivity batch (imf_core.guidance).
SENSITIVITY_SAMPLES = 256


def point_name(omega: float, interval: list[float]) -> str:
    return f"w{omega:g}_t{interval[0]:g}-{interval[1]:g}"


def sample_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of each sample from (seed, sample index): the same samples whatever the sharding,
    and the same noise at every grid point (common random numbers across omega)."""
    gens = (torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices)
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def real_indices(rows: int, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """Which training rows stand in for n real samples: n of them without replacement, or,
    when the set has fewer than n, a bootstrap (n draws with replacement)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    if rows >= n:
        return torch.randperm(rows, generator=gen)[:n], f"{n} of {rows} training rows"
    return torch.randint(0, rows, (n,), generator=gen), f"bootstrap: {n} draws of {rows} rows"


def load_model(weights: Path | StoredFile, input_size: int) -> torch.nn.Module:
    """The network in a weights file: our ema.safetensors (its model config in the metadata),
    or an official release state dict (.pth: architecture read off the tensors; `input_size`
    is the latent side, which those files do not record). A training's weights come as a
    StoredFile: read on this process's node."""
    from safetensors import safe_open

    from imf_core.models.config import ModelConfig

    weights = local_file(weights)
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), "pt") as f:
            model_cfg = ModelConfig(**json.loads(f.metadata()["model_config"]))
        model = build(model_cfg)
        model.load_state_dict(load_file(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = load_official(state, input_size=input_size)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Unit:
    """One unit of work: `count` samples from index `start` (shard `shard`) of one kind: a grid
    point ("point": eval.nfe MeanFlow steps), the many-step calibration at a point ("euler"), or
    real training rows ("real", the floor and the class means)."""

    omega: float
    interval: tuple[float, float]
    shard: int
    start: int
    count: int
    kind: str = "point"

    @property
    def name(self) -> str:
        point = point_name(self.omega, list(self.interval))
        prefix = {"point": point, "euler": f"euler_{point}", "real": "real"}[self.kind]
        return f"{prefix}_s{self.shard:05d}"


class UnitRunner:
    """What units need -- the model, tokenizer, feature extractor, the data rows -- opened once
    per process (the driver, each Ray actor, or a training rank), on that process's node: its
    files come as StoredFiles (or user-given paths), never as another node's local path.
    `weights` is a weights file (load_model) or the network itself (a training's, its EMA
    swapped in: tasks.inrun_eval). `expect` = (classes, latent shape) of the data, if known;
    `data` = the precompute output (an Output, for real rows), if any; `sdpa_backend` the
    network's attention kernel (train.sdpa_backend)."""

    def __init__(
        self,
        weights,
        input_size,
        tokenizer_cfg,
        kind,
        features,
        e,
        expect,
        data,
        sdpa_backend="auto",
        threads=0,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.e = e
        self.sdpa_backend = sdpa_backend
        self.device = pick_device(e.device)
        if isinstance(weights, torch.nn.Module):
            self.model = weights
        else:
            self.model = load_model(weights, input_size).to(self.device)
        m = self.model.cfg
        self.num_classes, self.shape = m.num_classes, (m.in_channels, m.input_size, m.input_size)
        if expect is not None and expect != (self.num_classes, self.shape):
            raise ValueError(
                f"the model in {weights} generates {self.shape} latents of {self.num_classes} "
                f"classes; the data has {expect[1]} and {expect[0]}"
            )
        t = tokenizer_cfg
        self.tokenizer = open_tokenizer(t.name, t.path, t.variant, e.device)
        from tasks.extractors import open_extractor

        self.extractor = open_extractor(kind, local_file(features)).to(self.device)
        self.rgb_extractor = kind == "inception"
        # the real rows, memory-mapped from this node's copy of the precompute output
        self.data = LatentDataset(data.local_copy(), sample_posterior=False) if data else None

    def features(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of latents, decoded and converted to uint8 as samples are."""
        images = to_uint8(self.tokenizer.decode(latents.to(self.device))).to(self.device)
        if images.shape[1] == 1 and self.rgb_extractor:
            images = images.repeat(1, 3, 1, 1)  # grey-scale data through an RGB network
        f, logits = self.extractor(images)
        return f.cpu(), logits.cpu()

    @torch.no_grad()
    def run(self, unit: Unit) -> tuple[str, dict]:
        """Generates (or reads) the unit's samples and reduces them to mergeable float64 sums,
        plus the features of its samples among the first prc_samples (precision / recall)."""
        e = self.e
        index = range(unit.start, unit.start + unit.count)
        if unit.kind == "real":
            rows = real_indices(self.data.num_rows, e.n_samples, e.seed)[0][
                index.start : index.stop
            ]
            latents, labels = self.data.rows(rows.tolist())
        else:
            latents = sample_noise(index, self.shape, e.seed)
            labels = torch.tensor(index) % self.num_classes
        feats, scores, correct, prc = [], [], 0, []
        for b in range(0, unit.count, e.batch_size):
            x, y = latents[b : b + e.batch_size].to(self.device), labels[b : b + e.batch_size]
            if unit.kind != "real":
                x = self.sample(unit, x, y.to(self.device))
            f, logits = self.features(x)
            feats.append(FeatureStats.of(f))
            scores.append(ScoreStats.of(logits))
            correct += int((logits.argmax(1) == y).sum())
            keep = max(0, min(len(f), e.prc_samples - unit.start - b))
            prc.append(f[:keep].float().numpy())
        fs, ss = FeatureStats.merge(feats), ScoreStats.merge(scores)
        sums = {"n": fs.n, "total": fs.total, "outer": fs.outer, "p_sum": ss.p_sum}
        sums |= {"plogp_sum": ss.plogp_sum, "correct": correct, "prc": np.concatenate(prc)}
        if unit.kind == "real":  # per-class latent sums: the class-mean ceiling
            class_sum = torch.zeros(self.num_classes, *self.shape, dtype=torch.float64)
            sums["class_sum"] = class_sum.index_add_(0, labels, latents.double()).numpy()
            sums["class_count"] = torch.bincount(labels, minlength=self.num_classes).numpy()
        return unit.name, sums

    @torch.no_grad()
    def sensitivity(self) -> dict[str, dict]:
        """The network's input sensitivity (imf_core.guidance.input_sensitivity) on a fixed
        batch: SENSITIVITY_SAMPLES noises from eval.seed, classes i mod K."""
        index = range(SENSITIVITY_SAMPLES)
        noise = sample_noise(index, self.shape, self.e.seed).to(self.device)
        y = (torch.tensor(index) % self.num_classes).to(self.device)
        return input_sensitivity(self.model, noise, y)

    def sample(self, unit: Unit, noise, y) -> torch.Tensor:
        """Latents of one batch: eval.nfe MeanFlow steps, or the many-step calibration."""
        t_min, t_max = unit.interval
        euler = unit.kind == "euler"
        steps = self.e.many_steps if euler else self.e.nfe
        with plain_attention(self.sdpa_backend):
            return generate(self.model, noise, y, unit.omega, t_min, t_max, steps, euler=euler)

    @torch.no_grad()
    def sample_grids(self, points, out: Output) -> list[str]:
        """A PNG grid per grid point (tasks.grids), `grids/<point>.png` in `out`: a row per
        grid class, grid_per_class columns, decoded through the tokenizer. Returns the names."""
        e = self.e
        noise, y = grid_inputs(self.num_classes, self.shape, e.grid_per_class, e.seed)
        noise, y = noise.to(self.device), y.to(self.device)
        names = []
        with plain_attention(self.sdpa_backend):
            for omega, interval in points:
                picture = decoded_grid(
                    self.model,
                    self.tokenizer,
                    noise,
                    y,
                    omega,
                    e.grid_per_class,
                    point_title(omega, interval),
                    tuple(interval),
                    e.nfe,
                )
                names.append(f"grids/{point_name(omega, interval)}.png")
                out.write_bytes(names[-1], png_bytes(picture))
        return names


def run_units(runner_args: tuple, local, units: list[Unit], e, ray_address: str):
    """Yields (unit name, sums) as units finish: in this process (on `local()`, the runner
    the sample grids use too), or on `e.workers` Ray actors (GPU actors when
    `e.gpus_per_worker` > 0) of the local or addressed cluster."""
    if e.workers <= 1 or len(units) <= 1:
        yield from (local().run(u) for u in units)
        return
    import ray
    from ray.util import ActorPool

    from tasks.cluster import connect_ray, require_resources

    connect_ray(ray_address, e.workers * e.cpus_per_worker)
    require_resources("eval", e.cpus_per_worker, e.gpus_per_worker)
    actor = ray.remote(num_cpus=e.cpus_per_worker, num_gpus=e.gpus_per_worker)(UnitRunner)
    threads = max(1, int(e.cpus_per_worker))
    actors = [actor.remote(*runner_args, threads) for _ in range(min(e.workers, len(units)))]
    try:
        yield from ActorPool(actors).map_unordered(lambda a, u: a.run.remote(u), units)
    finally:
        for a in actors:
            ray.kill(a)
