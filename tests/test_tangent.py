"""The explicit tangent pass (VelocityNet.u_and_tangent): torch.func.jvp's numbers without its
GEMMs by the weights' zero tangents, in eager and in the compiled step (issue 35).

The reference is forward-mode AD of the plain forward (meanflow.time_derivative), which
loss_of_draws used before and still uses for a module without u_and_tangent.
"""

import functools
import re
import sys
import types

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.utils import run_and_get_code
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from imf_core.guidance import Conditions, GuidanceConfig
from imf_core.meanflow import time_derivative
from imf_core.models import create, dummy_inputs
from imf_core.models.layers import jvp_attention, math_attention_jvp
from imf_core.objectives import OBJECTIVES, Draws, LossSpec, ObjectiveConfig, draw, loss_of_draws

F64 = torch.float64
SMALL = dict(
    input_size=8, in_channels=2, depth=3, width=32, heads=2, num_classes=5, aux_head_depth=1
)
# Both conditionings x both block kinds x the condition inputs: (cond_t on, omega and interval
# off: MeanFlow's) and (cond_t off, omega and interval on: iMF's).
CONDS = {"t": dict(cond_t=True, cond_omega=False, cond_interval=False), "cfg": {}}
NETWORKS = {
    f"{conditioning}-{blocks}-{conds}": dict(conditioning=conditioning, blocks=blocks)
    | CONDS[conds]
    for conditioning in ("in_context", "adaln")
    for blocks in ("plain", "advanced")
    for conds in CONDS
}


def network(**overrides) -> nn.Module:
    """A small float64 network moved away from its zero initialisation (else u = 0)."""
    torch.manual_seed(0)
    model = create("imf_b2", **SMALL | overrides).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(cfg, batch=3):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=F64)
    v = torch.randn(z.shape, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.8 + 0.1
    r = t * torch.rand(batch, generator=g, dtype=F64)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    omega = 1 + 3 * torch.rand(batch, generator=g, dtype=F64)
    t_min, t_max = 0.3 * torch.rand(batch, dtype=F64), 0.6 + 0.4 * torch.rand(batch, dtype=F64)
    return z, v, r, t, Conditions(y, omega, t_min, t_max)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ attention
def test_math_attention_jvp_is_the_jvp_of_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 7, 8, generator=g, dtype=F64) for _ in range(6))
    with sdpa_kernel(SDPBackend.MATH):
        out, d_out = torch.func.jvp(
            torch.nn.functional.scaled_dot_product_attention, (q, k, v), (dq, dk, dv)
        )
    got, d_got = math_attention_jvp(q, k, v, dq, dk, dv)
    assert rel(got, out) < 1e-12 and rel(d_got, d_out) < 1e-12


def test_jvp_attention_choice_and_the_fused_kernel_where_it_cannot_run(monkeypatch):
    # "auto" is math until the fused kernel is measured on a GPU.
    assert jvp_attention("auto") is math_attention_jvp is jvp_attention("math")
    for removed in ("flash_jvp", "triton"):
        with pytest.raises(ValueError, match="model.jvp_attention must be one of"):
            create("tiny", jvp_attention=removed)
    name = "imf_core.models.fused_attention"
    monkeypatch.setitem(sys.modules, name, None)  # the module missing: its import fails
    with pytest.raises(ValueError, match="jvp_attention=fused cannot be used here: importing"):
        jvp_attention("fused")
    stub = types.ModuleType(name)
    stub.FUSED_ATTENTION_AVAILABLE, stub.fused_attention_jvp = False, math_attention_jvp
    monkeypatch.setitem(sys.modules, name, stub)
    with pytest.raises(ValueError, match="FUSED_ATTENTION_AVAILABLE is False"):
        jvp_attention("fused")


def test_the_fused_choice_runs_the_fused_kernel_in_eager_and_compiled(monkeypatch):
    """With model.jvp_attention=fused every block's tangent pass calls fused_attention_jvp
    (here a stand-in that counts its calls), also inside a fullgraph compile."""
    calls = []

    def counted(*args):
        calls.append(1)
        return math_attention_jvp(*args)

    stub = types.ModuleType("imf_core.models.fused_attention")
    stub.FUSED_ATTENTION_AVAILABLE, stub.fused_attention_jvp = True, counted
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    plain, fused = network(), network(jvp_attention="fused")
    z, v, r, t, cond = inputs(plain.cfg)
    with torch.no_grad():
        expected = plain.u_and_tangent(z, v, t, t - r, cond)
        for run in (
            fused.u_and_tangent,
            torch.compile(fused.u_and_tangent, fullgraph=True, backend="eager"),
        ):
            calls.clear()
            u, du = run(z, v, t, t - r, cond)
            assert len(calls) == fused.cfg.depth
            assert rel(u, expected[0]) < 1e-12 and rel(du, expected[1]) < 1e-12


# ------------------------------------------------------------------- the whole network
@pytest.mark.parametrize("name", NETWORKS)
def test_tangent_pass_is_forward_mode_ad_of_the_forward(name):
    model = network(**NETWORKS[name])
    z, v, r, t, cond = inputs(model.cfg)
    reference = time_derivative(lambda z_, r_, t_: model(z_, t_, t_ - r_, cond), z, r, t, v)
    with torch.no_grad():
        u, du_dt = model.u_and_tangent(z, v, t, t - r, cond)
        assert rel(u, model(z, t, t - r, cond)) < 1e-12
    assert reference.abs().max() > 1e-3  # a derivative worth comparing
    assert rel(du_dt, reference) < 1e-12


def flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["in_context-advanced-cfg", "adaln-plain-t", "adaln-plain-cfg"])
def test_tangent_pass_counts_twice_the_forward_gemms_and_the_attention_tangent(name):
    """Exactly: each GEMM of the forward on the primal and on the tangent, except those of the
    embedders of constant conditions (omega, t_min, t_max), which have no tangent; and the
    attention's two products (q k^T, P v) with four more of their size for its tangent
    (dq k^T, q dk^T, dP v, P dv). No GEMM by a zero tangent. On the meta device, where the
    forward's SDPA is counted (the CPU's fused kernel has no FLOP formula)."""
    model = create("imf_b2", device="meta", **SMALL | NETWORKS[name])
    cfg, embedders, batch = model.cfg, model.embedders, 2
    z, t, h, cond = dummy_inputs(cfg, batch, "meta")
    forward = flops(model, z, t, h, cond)
    tangent_pass = flops(model.u_and_tangent, z, z, t, h, cond)
    seq = cfg.num_patches + getattr(model, "num_prefix", 0)
    # q k^T and P v: 2 B T^2 K multiply-adds each per head (H K = D), 2 FLOPs per multiply-add
    attention = cfg.depth * 2 * (2 * batch * seq**2 * cfg.width)
    constants = [e for e in (embedders.omega, embedders.t_min, embedders.t_max) if e is not None]
    freq, width = embedders.h.freq_dim, cfg.width
    constant_gemms = len(constants) * 2 * batch * (freq * width + width * width)
    forward_gemms = forward - attention
    assert forward_gemms > 0 and (constant_gemms > 0) == (name.endswith("cfg"))
    assert tangent_pass == 2 * forward_gemms - constant_gemms + 3 * attention


# ------------------------------------------------------------------------- the loss
class WithoutTangentPass(nn.Module):
    """The same network without u_and_tangent: loss_of_draws then takes du/dt by
    torch.func.jvp of the forward (its path before issue 35)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.has_aux_head = net.has_aux_head

    def forward(self, *args):
        return self.net(*args)


def float64_draws(draws: Draws) -> Draws:
    cond = Conditions(draws.cond.y, *(c.double() for c in draws.cond[1:]))
    return draws._replace(t=draws.t.double(), r=draws.r.double(), e=draws.e.double(), cond=cond)


def problem(objective: str, mode: str, batch: int = 8) -> tuple:
    """loss_of_draws's arguments after the model: a float64 batch, its draws and loss spec."""
    gen = torch.Generator().manual_seed(1)
    guidance = GuidanceConfig(mode=mode, **(dict(omega=1.5, kappa=0.5) if mode == "fixed" else {}))
    spec = LossSpec(ObjectiveConfig(name=objective), guidance, num_classes=5)
    x = torch.randn(batch, 2, 8, 8, generator=gen, dtype=F64)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen)
    torch.manual_seed(1)  # the draws' default source, whatever it is
    draws = float64_draws(draw(x, y, spec))
    return x, y, draws, spec


def loss_and_grads(fn, model: nn.Module, objective: str, mode: str):
    model.zero_grad(set_to_none=True)
    loss, _ = fn(model, *problem(objective, mode))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


LOSS_NETWORKS = ("in_context-advanced-cfg", "adaln-plain-t")


@pytest.mark.parametrize("name", LOSS_NETWORKS)
@pytest.mark.parametrize("mode", ("none", "fixed", "omega", "omega_interval"))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_and_gradients_equal_those_of_forward_mode_ad(objective, mode, name):
    model = network(**NETWORKS[name])
    loss, grads = loss_and_grads(loss_of_draws, model, objective, mode)
    ref_loss, ref_grads = loss_and_grads(loss_of_draws, WithoutTangentPass(model), objective, mode)
    assert rel(loss, ref_loss) < 1e-12 and rel(grads, ref_grads) < 1e-12


GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in GEMMS
        return func(*args, **(kwargs or {}))


def compiled_forward_gemms(model: nn.Module, objective: str, mode: str):
    """loss_of_draws compiled as train.compile=step does (fullgraph) by AOTAutograd with eager
    kernels: its loss, gradients and the GEMMs of its forward graph (guidance, JVP, forward)."""
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    compiled = torch.compile(loss_of_draws, fullgraph=True, dynamic=False, backend=backend)
    loss, grads = loss_and_grads(compiled, model, objective, mode)
    (graph,) = graphs  # one graph: fullgraph=True raises on a break
    gemms = sum(node.target in GEMMS for node in graph.graph.nodes)
    return loss, grads, gemms


def test_compiled_step_traces_the_tangent_pass_with_the_eager_numbers_and_gemms():
    """train.compile=step traces the tangent pass into its one graph with the reference's loss
    and gradients, and with the eager forward's GEMMs, where forward-mode AD's graph has more
    (its products by the weights' zero tangents)."""
    torch._dynamo.reset()
    objective, mode = "imf_aux", "omega_interval"  # the default, with every pass
    model = network(depth=2, **NETWORKS["in_context-advanced-cfg"])
    reference = WithoutTangentPass(model)
    loss, grads, gemms = compiled_forward_gemms(model, objective, mode)
    ref_loss, ref_grads, ref_gemms = compiled_forward_gemms(reference, objective, mode)
    assert rel(loss, ref_loss) < 1e-12 and rel(grads, ref_grads) < 1e-12
    with CountGemms() as eager:
        loss_of_draws(model, *problem(objective, mode))
    # The graph drops one: the output projection of the tangent pass's u, which the loss does
    # not use (eager computes it).
    assert gemms == eager.count - 1
    # Forward-mode AD: one GEMM by a zero tangent per linear on the tangent's path (5 a block,
    # the patch embedding, the h embedder's two, the output layer), kept in the graph.
    assert ref_gemms - gemms == 5 * model.cfg.depth + 4
    torch._dynamo.reset()


def test_the_tangent_pass_compiled_alone_gives_the_eager_numbers():
    """train.compile=jvp: the tangent pass alone under torch.compile (aot_eager)."""
    torch._dynamo.reset()
    model = network(depth=2, **NETWORKS["adaln-plain-cfg"])
    args = ("imf_aux", "omega_interval")
    loss, grads = loss_and_grads(loss_of_draws, WithoutTangentPass(model), *args)
    compiled_jvp = functools.partial(loss_of_draws, compile_jvp="aot_eager")
    got_loss, got_grads = loss_and_grads(compiled_jvp, model, *args)
    assert rel(got_loss, loss) < 1e-12 and rel(got_grads, grads) < 1e-12
    torch._dynamo.reset()


def test_inductor_code_of_the_tangent_pass_has_the_eager_gemms_only():
    """inductor's generated code (the CPU's C++ here) for the tangent pass calls a GEMM kernel
    exactly as often as eager runs one, less the unused u's output projection: none by a zero
    tangent (forward-mode AD's code keeps 5 * depth + 4 more, one addmm per linear)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create("tiny", depth=2)
    z, v, r, t, cond = inputs(model.cfg, batch=8)
    z, v, r, t = z.float(), v.float(), r.float(), t.float()
    cond = Conditions(cond.y % 10, *(c.float() for c in cond[1:]))

    def du_dt(z, v, r, t):
        with torch.no_grad():
            return model.u_and_tangent(z, v, t, t - r, cond)[1]

    with CountGemms() as eager:
        du_dt(z, v, r, t)
    _, code = run_and_get_code(torch.compile(du_dt, backend="inductor"), z, v, r, t)
    calls = re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", "\n".join(code))
    assert len(calls) == eager.count - 1
    torch._dynamo.reset()
