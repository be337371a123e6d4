"""train.compile=step: the whole loss and its backward as one graph, equal to eager.

The matrix (objective x guidance) compiles with the aot_eager backend: Dynamo and AOTAutograd
trace exactly what inductor would get, with fullgraph=True (a graph break is an error), and
the traced forward and backward run. One inductor test generates and runs the real kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from imf_core.guidance import GuidanceConfig
from imf_core.models import create
from imf_core.objectives import OBJECTIVES, DrawKey, LossSpec, ObjectiveConfig, draw, loss_of_draws
from imf_core.training import OptimConfig, Runtime, make_optimizer, train_step

MODES = ("none", "fixed", "omega", "omega_interval")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("tiny", width=32, depth=1, heads=2, aux_head_depth=1)
    with torch.no_grad():  # away from the zero-initialised output layers
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def loss_and_grads(fn, model, objective: str, mode: str, batch: int = 16):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    guidance = GuidanceConfig(mode=mode, **(dict(omega=1.5, kappa=0.5) if mode == "fixed" else {}))
    spec = LossSpec(ObjectiveConfig(name=objective), guidance, 10)
    draws = draw(x, y, spec, DrawKey(seed=1))
    model.zero_grad(set_to_none=True)
    loss, parts = fn(model, x, y, draws, spec)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads, parts


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_compiled_loss_is_one_graph_equal_to_eager(objective, mode):
    model = small_model()
    eager_loss, eager_grads, eager_parts = loss_and_grads(loss_of_draws, model, objective, mode)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_of_draws, fullgraph=True, dynamic=False, backend=counter)
    loss, grads, parts = loss_and_grads(compiled, model, objective, mode)
    assert counter.frame_count == 1  # one graph, no break (fullgraph would raise on one)
    assert rel(loss, eager_loss) < 1e-4 and rel(grads, eager_grads) < 1e-4
    assert parts.keys() == eager_parts.keys()
    loss_and_grads(compiled, model, objective, mode)  # the same shapes again: no recompile
    assert counter.frame_count == 1


def inductor_and_eager_steps() -> dict:
    """Two train_steps eager and two with compile=step, from the same model and draws: how far
    the compiled first step's loss and gradients and the final weights are from eager's
    (relative), and Dynamo's graph count after each compiled step."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    spec = LossSpec(ObjectiveConfig(name="imf_aux"), GuidanceConfig(mode="omega_interval"), 10)
    first, weights, graphs = {}, {}, []
    for compile in ("none", "step"):
        model = small_model()
        optim = OptimConfig(lr=1e-3)
        opt = make_optimizer(model, optim)
        for step in range(2):
            parts = train_step(
                model, opt, None, x, y, spec, step, optim, runtime=Runtime(compile=compile)
            )
            if compile == "step":
                graphs.append(counters["stats"]["unique_graphs"])
            if step == 0:  # the first step's loss and gradients (the optimizer leaves .grad)
                grads = torch.cat([p.grad.flatten() for p in model.parameters()])
                first[compile] = parts["loss"], grads
        weights[compile] = torch.cat([p.detach().flatten() for p in model.parameters()])
    (c_loss, c_grads), (loss, grads) = first["step"], first["none"]
    return {
        "loss": rel(c_loss, loss),
        "grads": rel(c_grads, grads),
        "weights": rel(weights["step"], weights["none"]),
        "graphs": graphs,
    }


def inductor_in_a_process(directory) -> subprocess.CompletedProcess:
    """inductor_and_eager_steps in a process of its own: the compile is ~60 s of mostly one
    core, so it runs beside the session's other tests (tests/conftest.py)."""
    script = "import json, test_compile; print(json.dumps(test_compile.inductor_and_eager_steps()))"
    tests = Path(__file__).resolve().parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.mark.slow
@pytest.mark.background(scenario=inductor_in_a_process)
def test_inductor_step_equals_eager_and_compiles_once(background):
    """The real kernels (inductor's C++ on the CPU), a whole train_step: loss, gradients and
    the updated weights equal eager float32; a second step of the same shapes reuses the graph.
    One compile: it is most of this test's time."""
    assert background.returncode == 0, background.stderr[-3000:]
    got = json.loads(background.stdout.strip().splitlines()[-1])
    assert got["loss"] < 1e-4 and got["grads"] < 1e-4 and got["weights"] < 1e-5
    first, second = got["graphs"]
    assert first == 1 and second == first  # one graph; new draws, the same graph


def test_bad_compile_mode_is_named():
    model = small_model()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="compile must be one of"):
        train_step(
            model,
            make_optimizer(model, OptimConfig()),
            None,
            x,
            y,
            LossSpec(ObjectiveConfig(), GuidanceConfig(), 10),
            0,
            OptimConfig(),
            runtime=Runtime(compile="full"),
        )
