"""One Ray Train worker's training (tasks.train runs `train_loop` on every worker of its
TorchTrainer), and what rank 0 reports from it: progress, MFU, MLflow metrics and sample grids.

    >>> TorchTrainer(train_loop, train_loop_config={"job": job, "mlflow_run_id": run_id})

Each worker reads its shard of the precomputed latents (a batch read ahead on a thread), builds
the model from the same seed, resumes from Ray's latest checkpoint, and runs train_step; every
rank reports the same checkpoints (rank 0 saves them), evaluates during training when that is on
(tasks.inrun_eval), and stops together on a non-finite loss or a stop request
(imf_core.training.StopAgreement).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from imf_core import peak_flops
from imf_core.models import build
from imf_core.objectives import LossSpec
from imf_core.training import step_flops_per_image
from tasks import inrun_eval, preemption
from tasks.journal import RunJournal
from tasks.storage import first_error_wins

# Set on import: in the driver (tasks.train imports this module before it builds its
# TorchTrainer) and in each worker (which imports it to run train_loop).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

# Markers rank 0 leaves in the training's output for the driver (tasks.train).
NAN_FILE = "NAN"  # the loss went non-finite: why, and that the last good checkpoint is kept
FAULT_FILE = "fault_injected"  # train.fault_at_step killed a worker once (tests)


def train_loop(config: dict) -> None:
    """One Ray Train worker: data shard, model, resume, steps, checkpoints, rank-0 logging.
    `config`: the training's job (tasks.train.TrainJob) and its MLflow run's id."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import BatchSampler, DistributedSampler, default_collate

    from imf_core.data import LatentDataset, Prefetcher
    from imf_core.ema import EMA
    from imf_core.training import (
        DEFAULT_COMPILE,
        Runtime,
        StopAgreement,
        make_optimizer,
        train_step,
        with_warmup_steps,
    )
    from tasks.provenance import device_name

    job = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = job.out
    t = job.train
    if t.batch_size % world:
        raise ValueError(f"train.batch_size {t.batch_size} does not split over {world} workers")
    local_batch = t.batch_size // world

    dataset = LatentDataset(job.data_out.local_copy(), seed=t.seed)  # one copy per node
    mcfg = job.model
    expected = ((mcfg.in_channels, mcfg.input_size, mcfg.input_size), mcfg.num_classes)
    if (dataset.latent_shape, dataset.num_classes) != expected:
        raise ValueError(
            f"model {job.model_name} expects latents {expected[0]} and {expected[1]} classes; "
            f"the data has {dataset.latent_shape} and {dataset.num_classes}"
        )
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build(mcfg).to(device)
    optimizer = make_optimizer(model, job.optim)
    ema = EMA(model, job.optim.ema_decay)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "state.pt", weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step = state["step"]
    # Data parallel without DDP: every rank starts from the same weights (the seed above) and
    # train_step averages the gradients over the ranks (imf_core.training.average_gradients).
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=t.seed)
    steps_per_epoch = math.ceil(len(sampler) / local_batch)  # len(dataset): its images
    total = t.steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    optim = with_warmup_steps(job.optim, steps_per_epoch)
    bf16 = device.type == "cuda"
    spec = LossSpec(job.objective, job.guidance, mcfg.num_classes)
    runtime = Runtime(
        compile=DEFAULT_COMPILE if t.compile == "auto" else t.compile,
        sdpa_backend=t.sdpa_backend,
        micro_batch=t.micro_batch,
        shard=(rank, world),
    )
    logger = None
    if rank == 0:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        flops = flops_per_image(job.model, job.objective, job.guidance)
        utilisation = Utilisation.of(flops, gpu, world)
        logger = RankZeroLogger(job, config["mlflow_run_id"], dataset, total, utilisation)
    if logger is not None:  # the device the workers run on (the driver cannot know it)
        logger.run.tags({"imf.device": f"{world} x {device_name(device)}"})
        if checkpoint is not None:  # a relaunch, or Ray Train's restart after a lost worker
            print(f"{logger.label}resumed from the checkpoint of step {step}", flush=True)
    start_time, start_step = time.perf_counter(), step
    evaluation = None
    if job.inrun is not None:
        evaluation = inrun_eval.InRunEvaluation(job.inrun, rank, world, device, steps_per_epoch)

    def batches(start: int) -> Iterator[tuple[int, list[int]]]:
        """(epoch, indices) of this rank's batch at every step from `start` to the end."""
        at = start
        while at < total:
            epoch, skip = divmod(at, steps_per_epoch)
            sampler.set_epoch(epoch)
            for indices in list(BatchSampler(sampler, local_batch, drop_last=False))[skip:]:
                if at == total:
                    return
                yield epoch, indices
                at += 1

    def load(batch: tuple[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as a step reads it (page-locked on CUDA: an asynchronous copy), made on the
        prefetching thread, the only one that reads the dataset while the loop runs."""
        epoch, indices = batch
        dataset.set_epoch(epoch)
        x, y = default_collate(dataset.__getitems__(indices))
        return (x.pin_memory(), y.pin_memory()) if device.type == "cuda" else (x, y)

    # [loss not finite, a stop asked for], agreed by every rank a step late (StopAgreement)
    agreement = StopAgreement(world)

    def evaluate(at: int) -> None:  # every rank; rank 0 logs
        results = evaluation(at, model, ema)
        if logger is not None:
            logger.evaluation(at, results, evaluation.seconds, start_time)

    stop_poll = preemption.StopPoll(out)
    # the journal's last send, also when the loop failed (a failure of its own, on a store
    # that went away, is a note on the loop's error: first_error_wins)
    journal = nullcontext() if logger is None else closing(logger.run)
    with first_error_wins(journal, "the journal's last send"):
        if evaluation is not None and evaluation.due(step, total) and not evaluation.done(step):
            evaluate(step)  # resumed from the checkpoint of an evaluation a stop cut short
        with Prefetcher(load, batches(step)) as prefetched:  # the next batch read meanwhile
            for _, (x, y) in prefetched:
                if step == t.fault_at_step and rank == world - 1 and not out.exists(FAULT_FILE):
                    # A worker dies mid-run (tests). It waits first: Ray registers a reported
                    # checkpoint asynchronously, and one reported just before a crash can be lost.
                    out.write_text(FAULT_FILE, str(step))
                    time.sleep(5)
                    os.kill(os.getpid(), signal.SIGKILL)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    parts = train_step(
                        model,
                        optimizer,
                        ema,
                        x,
                        y,
                        spec,
                        step,
                        optim,
                        seed=t.seed,  # the draws: a function of (seed, step, global row)
                        total_steps=total,
                        runtime=runtime,
                    )
                stop_asked = rank == 0 and stop_poll()
                agreement.post(step, parts["loss"], stop_asked)
                step += 1
                agreement.settle()  # the steps before this one: done by now, no stall
                due = evaluation is not None and evaluation.due(step, total)
                ahead = step % t.checkpoint_every == 0 or step % t.log_every == 0
                if ahead or due or step == total or agreement.stop:
                    # a checkpoint, a log line, an evaluation or the end: this step too
                    agreement.settle(everything=True)
                if agreement.bad_step is not None:  # every rank stops at the same report
                    if rank == 0:
                        out.write_text(
                            NAN_FILE,
                            f"loss is not finite at step {agreement.bad_step}; "
                            "the last good checkpoint is kept",
                        )
                    ray.train.report({"step": agreement.bad_step, "nan": 1})
                    return
                stop = agreement.stop
                if step % t.log_every == 0 or step == total:
                    if world > 1:  # log the global batch's numbers, not rank 0's share
                        names = sorted(parts)
                        values = torch.stack([parts[k].float() for k in names]).to(device)
                        torch.distributed.all_reduce(values)
                        parts = dict(zip(names, values / world, strict=True))
                    if logger is not None:
                        logger.step(step, parts, optimizer, start_time, start_step)
                # the in-run evaluation's weights are a checkpoint's: a stop during it resumes
                evaluating = due and not stop
                if step % t.checkpoint_every == 0 or step == total or stop or evaluating:
                    report(step, model, optimizer, ema, rank, logger)
                if evaluating:
                    evaluate(step)
                if stop and step < total:  # preempted: checkpointed at this step, now end
                    if rank == 0:
                        out.write_text(preemption.STOPPED_FILE, str(step))
                    return


def report(step: int, model, optimizer, ema, rank: int, logger) -> None:
    """Every rank reports (Ray Train needs the same number of reports on all); rank 0 saves."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict(),
                "step": step,
            }
            torch.save(state, Path(tmp) / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            logger.samples(step, model, ema)
        ray.train.report({"step": step}, checkpoint=checkpoint)


_FLOPS: dict[str, float] = {}


def flops_per_image(model_cfg, objective, guidance) -> float:
    """One training step's useful FLOPs per image (training.step_flops_per_image), counted on
    the meta device once per (model, objective, guidance): instant, no memory."""
    key = repr((model_cfg, objective, guidance))
    if key not in _FLOPS:
        with torch.device("meta"):
            meta = build(model_cfg)
        spec = LossSpec(objective, guidance, model_cfg.num_classes)
        _FLOPS[key] = step_flops_per_image(meta, spec)
    return _FLOPS[key]


@dataclass(frozen=True)
class Utilisation:
    """The training's MFU as the field counts it: useful FLOPs per second over the datasheet
    dense bf16 peak of the workers' GPUs (imf_core.peak_flops). A device with no datasheet
    peak (the CPU, a GPU not in the table) has no MFU."""

    flops_per_image: float
    world: int
    device: str  # torch.cuda.get_device_name(), or "cpu"
    peak: tuple[str, float] | None  # (datasheet name, TFLOP/s)

    @staticmethod
    def of(flops_per_image: float, device: str, world: int) -> Utilisation:
        return Utilisation(flops_per_image, world, device, peak_flops.datasheet_peak(device))

    def mfu(self, samples_per_s: float) -> float | None:
        """MFU at `samples_per_s` images a second over all `world` workers; None without a peak."""
        if self.peak is None:
            return None
        return peak_flops.mfu(samples_per_s * self.flops_per_image, self.world * self.peak[1])

    def basis(self) -> str:
        """What MFU divides by, for the run's tag (imf.mfu_peak)."""
        return peak_flops.peak_basis(self.device)


class RankZeroLogger:
    """Terminal progress and MLflow metrics/images, from rank 0 only."""

    def __init__(self, job, run_id: str, dataset, total: int, utilisation: Utilisation):
        # Journaled first, sent by a background thread (a tracking outage never stops training).
        # After a restart from a checkpoint the steps since it run again (the same numbers):
        # the journal already has them, so each step is logged exactly once.
        self.run = RunJournal(job.tracking.uri, run_id, job.out)
        self.job, self.total, self.dataset = job, total, dataset
        # Named by run where a sweep's concurrent trainings print side by side.
        self.label = f"{job.tracking.run_name}: " if job.tracking.run_name else ""
        self.utilisation = utilisation
        self.last = time.perf_counter()
        self.tokenizer = None  # opened at the first sample grid
        self.run.tags({"imf.mfu_peak": utilisation.basis()})
        print(
            f"{self.label}MFU over {utilisation.basis()}; "
            f"{utilisation.flops_per_image / 1e9:.4g} GFLOP per image a step",
            flush=True,
        )

    def step(self, step: int, parts: dict, optimizer, start: float, start_step: int) -> None:
        t = self.job.train
        now = time.perf_counter()
        rate = (step - start_step) / max(now - start, 1e-9)
        metrics = {k: float(v) for k, v in parts.items()}
        metrics |= {
            "lr": optimizer.param_groups[0]["lr"],
            "steps_per_s": rate,
            "samples_per_s": rate * t.batch_size,
        }
        utilisation = self.utilisation.mfu(rate * t.batch_size)
        if utilisation is not None:  # no MFU on a device without a datasheet peak
            metrics["mfu"] = utilisation
        replayed = not self.run.metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        eta = (self.total - step) / max(rate, 1e-9)
        shown = f"  MFU {100 * utilisation:.1f} %" if utilisation is not None else ""
        print(  # named by run: a sweep's concurrent trainings print side by side
            f"{self.label}step {step}/{self.total}  loss {metrics['loss']:.4f}  "
            f"mse_u {metrics['mse_u']:.4f}  {rate:.2f} it/s{shown}  eta {eta:.0f}s"
            + ("  (replayed: logged before)" if replayed else ""),
            flush=True,
        )

    def evaluation(self, step: int, results: dict, seconds: float, start: float) -> None:
        """The in-run evaluation at `step` (tasks.inrun_eval): metrics over steps, one line."""
        metrics = inrun_eval.metrics_of(results) | {"eval/seconds": results["seconds"]}
        replayed = not self.run.metrics(metrics, step, group="eval")
        best = min(results["points"], key=lambda r: r["fid"])
        share = seconds / max(time.perf_counter() - start, 1e-9)
        print(
            f"{self.label}eval at step {step}: FID {best['fid']:.2f} at omega {best['omega']:g} "
            f"[{best['t_min']:g}, {best['t_max']:g}] ({best['n_samples']} samples"
            + (
                f", real data {results['real_data_floor']['fid']:.2f}"
                if "real_data_floor" in results
                else ""
            )
            + f"); {results['seconds']:.1f} s, {100 * share:.1f} % of this launch's time"
            + ("  (replayed: logged before)" if replayed else ""),
            flush=True,
        )

    def samples(self, step: int, model, ema) -> None:
        """A grid of 1-NFE EMA samples (tasks.grids): one row per grid class, fixed noise,
        decoded through the precompute's tokenizer (the SD-VAE for latent data)."""
        t = self.job.train
        if not (step == self.total or (t.sample_every and step % t.sample_every == 0)):
            return
        from tasks.grids import decoded_grid, grid_inputs, png_bytes, point_title
        from tasks.tokenizers import open_tokenizer

        device = next(model.parameters()).device
        if self.tokenizer is None:
            tok = self.job.tokenizer
            self.tokenizer = open_tokenizer(tok.name, tok.path, tok.variant, str(device))
        per_class = 8
        noise, y = grid_inputs(
            self.dataset.num_classes, self.dataset.latent_shape, per_class, seed=0
        )
        omega = 2.0 if self.job.guidance.conditions_on_omega else 1.0
        title = f"step {step}, EMA, {point_title(omega, (0.0, 1.0))}"
        with ema.swap_in(model):
            picture = decoded_grid(
                model, self.tokenizer, noise.to(device), y.to(device), omega, per_class, title
            )
        self.run.artifact(f"samples_step{step:07d}.png", png_bytes(picture), "samples")
