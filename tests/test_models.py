"""Models: sizes against the paper, zero-init, JVP through the training attention path."""

import pytest
import torch

from imf_core.guidance import Conditions
from imf_core.meanflow import time_derivative
from imf_core.models import count_flops, count_params, create, preset

# (preset, inference params in M, forward GFLOPs (multiply-adds)); Tab. 4, Tab. 1c, MF paper.
PAPER_SIZES = [
    ("imf_b2", 89, 24.9),
    ("imf_m2", 174, 49.9),
    ("imf_l2", 409, 116.4),
    ("imf_xl2", 610, 174.6),
    ("mf_b2", 131, None),
    ("mf_xl2", 676, None),
    ("imf_b2_adaln", 133, None),
    ("imf_b2_in_context", 89, None),
]


@pytest.mark.parametrize(("name", "params_m", "gflops"), PAPER_SIZES)
def test_sizes_match_the_paper(name, params_m, gflops):
    model = create(name, device="meta")
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.03)
    if gflops is not None:
        assert count_flops(model) / 1e9 == pytest.approx(gflops, rel=0.05)


def test_inference_count_leaves_out_the_aux_head():
    model = create("imf_b2", device="meta")
    no_aux = create("imf_b2", device="meta", aux_head_depth=0)
    assert count_params(model, inference=False) > count_params(model)
    # The v-head duplicates the last 8 blocks: 8 blocks and one output layer more in training.
    block = sum(p.numel() for p in model.blocks.trunk[0].parameters())
    final = sum(p.numel() for p in model.v_final.parameters())
    assert count_params(model, inference=False) - count_params(model) == 8 * block + final
    assert count_params(no_aux) == count_params(model)


def inputs(cfg, batch=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(
        batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype
    )
    t = torch.rand(batch, generator=g, dtype=dtype) * 0.8 + 0.1
    r = t * torch.rand(batch, generator=g, dtype=dtype)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    omega = 1 + 3 * torch.rand(batch, generator=g, dtype=dtype)
    cond = Conditions(
        y, omega, 0.3 * torch.rand(batch, dtype=dtype), 0.6 + 0.4 * torch.rand(batch, dtype=dtype)
    )
    return x, r, t, cond


SMALL = dict(
    input_size=8, in_channels=2, depth=3, width=32, heads=2, num_classes=5, aux_head_depth=1
)
FAMILIES = {
    "in_context_advanced": ("imf_b2", {}),
    "in_context_plain": ("imf_b2_in_context", {}),
    "adaln_plain": ("mf_b2", {}),
    "adaln_cfg_conditioned": ("imf_b2_adaln", {}),
    "in_context_with_t": ("imf_b2", {"cond_t": True}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_model_outputs_exactly_zero(family):
    name, extra = FAMILIES[family]
    model = create(name, **SMALL | extra)
    x, r, t, cond = inputs(model.cfg)
    u, v = model(x, t, t - r, cond, heads="uv")
    assert u.shape == v.shape == x.shape
    assert torch.count_nonzero(u) == 0 and torch.count_nonzero(v) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_jvp_matches_finite_differences(family):
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = create(name, **SMALL | extra).double()
    with torch.no_grad():  # leave zero-init so that u depends on every input
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x, r, t, cond = inputs(model.cfg, dtype=torch.float64)
    cond = Conditions(cond.y, *(c.double() for c in cond[1:]))
    v = torch.randn_like(x)

    def u_fn(z, r_, t_):
        return model(z, t_, t_ - r_, cond)

    du_dt = time_derivative(u_fn, x, r, t, v)
    eps = 1e-6
    fd = (u_fn(x + eps * v, r, t + eps) - u_fn(x - eps * v, r, t - eps)) / (2 * eps)
    assert du_dt.abs().max() > 1e-3
    torch.testing.assert_close(du_dt, fd, rtol=1e-5, atol=1e-6)


def test_plain_forward_keeps_the_fused_kernel():
    # The default CPU SDPA is the fused flash kernel, which has no forward-mode AD; jvp works
    # only because time_derivative selects the math backend. This guards that split.
    model = create("tiny")
    x, r, t, cond = inputs(model.cfg)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda z: model(z, t, t - r, cond), (x,), (x,))
    assert (
        time_derivative(lambda z, r_, t_: model(z, t_, t_ - r_, cond), x, r, t, x).shape == x.shape
    )


def test_bad_presets_and_configs_are_named():
    with pytest.raises(KeyError, match="imf_q2"):
        create("imf_q2")
    with pytest.raises(TypeError, match="widht"):
        preset("tiny", widht=64)
    with pytest.raises(ValueError, match="heads"):
        create("tiny", width=100, heads=3)
    with pytest.raises(ValueError, match="conditioning"):
        create("tiny", conditioning="film")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_jvp_on_gpu_through_the_training_attention_path():
    torch.manual_seed(0)
    model = create("imf_b2", **SMALL).cuda().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x, r, t, cond = inputs(model.cfg, dtype=torch.float64)
    x, r, t, v = x.cuda(), r.cuda(), t.cuda(), torch.randn_like(x).cuda()
    cond = Conditions(cond.y.cuda(), *(c.cuda().double() for c in cond[1:]))

    def u_fn(z, r_, t_):
        return model(z, t_, t_ - r_, cond)

    du_dt = time_derivative(u_fn, x, r, t, v)
    eps = 1e-6
    fd = (u_fn(x + eps * v, r, t + eps) - u_fn(x - eps * v, r, t - eps)) / (2 * eps)
    torch.testing.assert_close(du_dt, fd, rtol=1e-5, atol=1e-6)
    # bf16 autocast, the GPU training precision: finite and close to the float64 derivative.
    model.float()
    cond32 = Conditions(cond.y, *(c.float() for c in cond[1:]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        du_dt_bf16 = time_derivative(
            lambda z, r_, t_: model(z, t_, t_ - r_, cond32),
            x.float(),
            r.float(),
            t.float(),
            v.float(),
        )
    assert torch.isfinite(du_dt_bf16).all()
    assert (du_dt_bf16.double() - du_dt).norm() / du_dt.norm() < 0.05
    # The training's tangent pass (u_and_tangent): the same derivative, in float64 and bf16.
    model.double()
    with torch.no_grad():
        _, explicit = model.u_and_tangent(x, v, t, t - r, cond)
        model.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, explicit_bf16 = model.u_and_tangent(
                x.float(), v.float(), t.float(), (t - r).float(), cond32
            )
    torch.testing.assert_close(explicit, du_dt, rtol=1e-10, atol=1e-12)
    assert (explicit_bf16.double() - du_dt).norm() / du_dt.norm() < 0.05


def test_initialisation_is_the_official_one_at_b2():
    """Official iMF init, measured on its B/2 (the issue's numbers): block linears
    N(0, 0.32^2 / fan_in) (q 0.0115, w2 0.0071), embedder MLPs N(0, 1 / fan_in) (0.0626, 0.0361),
    label table N(0, 1 / D) (0.0361); tokens N(0, 1 / D); xavier patch embedding."""
    torch.manual_seed(0)
    model = create("imf_b2")
    block = model.blocks.v_head[3]
    stds = {
        "qkv": block.attn.qkv.weight.std(),
        "proj": block.attn.proj.weight.std(),
        "w1": block.mlp.w1.weight.std(),
        "w2": block.mlp.w2.weight.std(),
        "embed0": model.embedders.t_max.mlp[0].weight.std(),
        "embed2": model.embedders.t_max.mlp[2].weight.std(),
        "label": model.embedders.y.table.weight.std(),
        "tokens": model.type_tokens["omega"].std(),
        "patch": model.x_embed.proj.weight.std(),
    }
    expected = {
        "qkv": 0.0115,
        "proj": 0.0115,
        "w1": 0.0115,
        "w2": 0.0071,
        "embed0": 0.0626,
        "embed2": 0.0361,
        "label": 0.0361,
        "tokens": 0.0361,
        "patch": (2 / (2 * 2 * 4 + 768)) ** 0.5,  # xavier-uniform's std
    }
    for name, value in expected.items():
        assert stds[name].item() == pytest.approx(value, rel=0.03), name
    assert block.attn.qkv.weight.mean().abs() < 1e-4
    assert (block.attn_scale == 0).all() and (model.u_final.linear.weight == 0).all()


def test_meanflows_dit_keeps_dits_initialisation():
    torch.manual_seed(0)
    model = create("mf_b2", **SMALL)
    assert model.cfg.init == "dit"
    lin = model.blocks.trunk[0].attn.qkv.weight  # xavier-uniform: std sqrt(2 / (fan_in + fan_out))
    assert lin.std().item() == pytest.approx((2 / (32 + 96)) ** 0.5, rel=0.05)
    assert model.embedders.h.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="model.init"):
        create("tiny", init="kaiming")
