"""train.micro_batch: a step accumulated over micro-batches is the step on the whole batch
(same draws, same loss, same update), eager and compiled; a batch that does not split is
refused when the config is read."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from imf_core.ema import EMA
from imf_core.guidance import GuidanceConfig
from imf_core.models import create
from imf_core.objectives import DrawKey, LossSpec, ObjectiveConfig, draw
from imf_core.training import OptimConfig, Runtime, make_optimizer, train_step
from tasks.config import ConfigError, load_config


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the draws (torch.randn) too, not only the model
    yield
    torch.set_default_dtype(before)


def model_and_batch(batch: int = 16):
    torch.manual_seed(0)
    model = create("tiny", width=32, depth=1, heads=2, aux_head_depth=1)
    with torch.no_grad():  # away from the zero-initialised output layers
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, x, y


def one_step(model, x, y, objective: str, micro_batch: int, compile: str = "none") -> dict:
    """One train_step from a copy of `model`: its logged parts, gradients, weights and EMA."""
    model = copy.deepcopy(model)
    optim = OptimConfig(lr=1e-3)
    optimizer, ema = make_optimizer(model, optim), EMA(model, 0.5)
    parts = train_step(
        model,
        optimizer,
        ema,
        x,
        y,
        # omega ~ p(omega), CFG interval, class drop
        LossSpec(ObjectiveConfig(name=objective), GuidanceConfig(mode="omega_interval"), 10),
        0,
        optim,
        seed=5,
        runtime=Runtime(compile=compile, compile_backend="aot_eager", micro_batch=micro_batch),
    )
    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
    return {
        "parts": parts,
        "grads": flat(p.grad for p in model.parameters() if p.grad is not None),
        "weights": flat(model.parameters()),
        "ema": flat(ema.shadow.values()),
        "state": flat(s["exp_avg_sq"] for s in optimizer.state.values()),
    }


@pytest.mark.parametrize(("objective", "batch"), [("imf_aux", 16), ("fm", 16), ("imf_aux", 15)])
def test_an_accumulated_step_is_the_whole_batch_step(objective, batch, float64):
    """Micro-batches of 4 rows against one step of the batch, float64: the logged loss and every
    part, the summed gradients, AdamW's state, the weights after the step and the EMA. A batch
    of 15 (an epoch's last) makes micro-batches of 4, 4, 4 and 3."""
    model, x, y = model_and_batch(batch)
    whole, micro = one_step(model, x, y, objective, 0), one_step(model, x, y, objective, 4)
    assert micro["parts"].keys() == whole["parts"].keys() >= {"loss", "mse_u", "grad_norm"}
    for name, value in whole["parts"].items():
        torch.testing.assert_close(micro["parts"][name], value, rtol=0, atol=1e-6)
    assert whole["grads"].abs().max() > 1e-2  # a real gradient, not a zero-initialised one
    torch.testing.assert_close(micro["grads"], whole["grads"], rtol=1e-9, atol=1e-12)
    for key in ("state", "weights", "ema"):
        torch.testing.assert_close(micro[key], whole[key], rtol=0, atol=1e-6)


def test_a_micro_steps_draws_are_those_of_a_split_over_more_ranks():
    """Rows k::K of rank r's draws (of W ranks) are what rank r + W k of W K ranks draws: the
    split data parallelism already makes equal to the global batch (test_objectives). The
    r = t share (7 of 24 rows) leaves micro-batches with 2, 1 and 1 of them."""
    objective = ObjectiveConfig(name="imf_aux", boundary_share=0.3)
    spec = LossSpec(objective, GuidanceConfig(mode="omega_interval", class_drop=0.3), 10)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 1, 8, 8, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    world, steps = 2, 3
    for rank in range(world):
        mine = slice(rank, None, world)
        drawn = draw(x[mine], y[mine], spec, DrawKey(seed=9), (rank, world))
        for k in range(steps):
            rows = slice(rank + world * k, None, world * steps)
            shard = (rank + world * k, world * steps)
            want = draw(x[rows], y[rows], spec, DrawKey(seed=9), shard)
            got = drawn.micro(k, steps)
            assert got.jvp_from == want.jvp_from
            for a, b in zip(
                (got.t, got.r, got.e, *got.cond, got.dropped),
                (want.t, want.r, want.e, *want.cond, want.dropped),
                strict=True,
            ):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [drawn.micro(k, steps).jvp_from for k in range(steps)] == [1, 1, 1]  # rank 1: 3 of 12


@pytest.fixture
def fresh_dynamo():
    """No graph compiled before (the counters are the session's: test_compile's run first)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_a_compiled_accumulated_step_equals_eager_in_one_graph(fresh_dynamo):
    """train.compile=step with micro-batches: the aot_eager backend traces what inductor gets
    (tests/test_compile.py); every micro-step has the same shapes and r = t share, so the four
    run one graph."""
    model, x, y = model_and_batch()
    eager = one_step(model, x, y, "imf_aux", 4)
    compiled = one_step(model, x, y, "imf_aux", 4, compile="step")
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled["parts"]["loss"], eager["parts"]["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled["grads"], eager["grads"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled["weights"], eager["weights"], rtol=1e-5, atol=1e-6)


def test_a_micro_batch_that_does_not_split_the_batch_is_refused():
    ok = load_config(
        "smoke", ["train.batch_size=96", "train.num_workers=2", "train.micro_batch=16"]
    )
    assert ok.train.micro_batch == 16
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["train.batch_size=96", "train.num_workers=2", "train.micro_batch=32"])
    message = str(err.value)
    for name in ("train.micro_batch 32", "train.batch_size 96", "train.num_workers 2", "48"):
        assert name in message


def test_the_plan_shows_the_memory_per_gpu_and_refuses_a_batch_over_what_fit(tmp_path, capsys):
    """Tab. 2 on 8 GPUs (the RayJob's): XL/2's 128 a GPU did not fit the newest GPU check's
    H200 (2026-12-04-h200-run2.json: 96 fit at a first step, + 5.3 GiB of AdamW state; 112 ran
    out of memory in a timed step); the sweep's micro-batches of 64 do. The check has no L/2."""
    from flows.cli import main
    from flows.gpu_memory import check_gpu_memory, per_gpu_memory
    from flows.gpu_rates import Rates
    from flows.sweep_config import load_sweep, variant_configs

    gpu = ["train.use_gpu=true", "train.num_workers=8", f"paths.artifacts={tmp_path}/a"]
    plan = ["sweep", "table2_sizes", "--scale", "paper", "--plan", "--only"]
    assert main([*plan, "b2", *gpu]) == 0  # (B/2: its FLOPs are counted in a third of XL/2's time)
    b2 = "per GPU: batch 128, ~41 GiB of 140: 384 fit on the NVIDIA H200 (2026-12-04-h200-run2.json"
    assert b2 in capsys.readouterr().out
    assert main([*plan, "xl2", *gpu, "train.micro_batch=0"]) == 2
    refused = "per-GPU batch 128 of XL/2 is over the 96 that fit on the NVIDIA H200"
    err = capsys.readouterr().err
    assert refused in err and err.strip().endswith("set train.micro_batch=64")
    assert not (tmp_path / "a").exists()

    sweep = load_sweep("table2_sizes")
    configs = variant_configs(sweep, "paper", gpu, [])
    rates = Rates.of("h200")
    xl2 = "per GPU: batch 64 (train.micro_batch: 2 micro-steps), ~82 GiB of 140: 96 fit on the "
    xl2 += "NVIDIA H200 (2026-12-04-h200-run2.json; imf_aux, eager, bf16, a first step + 5.3 GiB"
    assert per_gpu_memory(configs["xl2"], rates).startswith(xl2)
    assert per_gpu_memory(configs["l2"], rates).endswith("has no figure for L/2")
    # what the validation before a run calls: the same refusal, without a plan
    check_gpu_memory(configs.values())
    configs = variant_configs(sweep, "paper", [*gpu, "train.micro_batch=0"], [])
    with pytest.raises(ConfigError, match=refused):
        check_gpu_memory(configs.values())


def test_a_run_and_a_sweep_refuse_a_batch_over_what_fit_before_any_work(tmp_path, capsys):
    """Not only the plan: `imf run` and `imf sweep` (and their flows: checked_config,
    checked_sweep) refuse it before the files are checked or anything starts."""
    from flows.cli import main

    gpu = ["train.use_gpu=true", f"paths.artifacts={tmp_path}/a"]
    assert main(["run", "-e", "imagenet_b2", "model.name=imf_xl2", *gpu]) == 2
    err = capsys.readouterr().err
    assert "per-GPU batch 256 of XL/2 is over the 96 that fit on the NVIDIA H200" in err
    sweep = ["sweep", "table2_sizes", "--scale", "paper", "--only", "xl2", "--allow-dirty"]
    assert main([*sweep, *gpu, "train.num_workers=8", "train.micro_batch=0"]) == 2
    assert "set train.micro_batch=64" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_steady_state_check_is_taken_as_measured():
    """A GPU check that probed after an optimizer step (benchmarks/gpu_check.py since
    2026-12-06): its largest batch and peaks as they are; the memory between two probes on
    the line through them; a model the check did not measure, as configured, has no figure."""
    from flows.gpu_memory import per_gpu_memory
    from flows.gpu_rates import Rates

    search = {"largest_fitting": 48, "probes": {"32": 60.0, "48": 75.0, "64": "oom"}}
    rates = Rates("NVIDIA H100", 989.0, "h100.json", memory_gib=79.2)
    rates.max_batch = {"XL/2": search | {"after_optimizer_step": True}}
    on_four = ["model.name=imf_xl2", "train.use_gpu=true", "train.num_workers=4"]
    cfg = load_config("imagenet_b2", on_four)  # batch 256: 64 a GPU
    with pytest.raises(ConfigError, match="64 of XL/2 is over the 48 that fit on the NVIDIA H100"):
        per_gpu_memory(cfg, rates)
    cfg.train.micro_batch = 32
    assert per_gpu_memory(cfg, rates).startswith(
        "per GPU: batch 32 (train.micro_batch: 2 micro-steps), ~60 GiB of 79: 48 fit"
    )
    cfg.train.micro_batch = 16  # below the probes: on the line through the nearest two
    line = per_gpu_memory(cfg, rates)
    assert "4 micro-steps), ~45 GiB of 79" in line and "a steady-state step" in line
    deeper = load_config("imagenet_b2", [*on_four, "model.depth=40"])
    assert per_gpu_memory(deeper, rates).endswith("has no figure for imf_xl2 as configured")
    assert per_gpu_memory(load_config("imagenet_b2", []), rates) == ""  # train.use_gpu false


def test_the_memory_probe_measures_the_step_after_an_optimizer_step():
    """benchmarks.step_time.StepTimer.memory, what the GPU check's largest-batch search reads:
    its measured step is the second, after AdamW made its state (two float32 copies of the
    weights, ~5 GiB at XL/2, which a first step's peak misses)."""
    from benchmarks.step_time import StepTimer

    model, _, _ = model_and_batch()
    timer = StepTimer(model, 8)
    steps = []
    timer.optimizer.register_step_pre_hook(lambda opt, *_: steps.append(len(opt.state)))
    assert timer.memory("imf_aux") > 0
    assert steps == [0, len(list(model.parameters()))]  # the measured step found the state made
