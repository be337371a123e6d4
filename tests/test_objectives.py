"""Objectives: the time sampler, the adaptive weighting and what each objective differentiates."""

import pytest
import torch

from imf_core.ema import EMA
from imf_core.guidance import GuidanceConfig
from imf_core.models import create
from imf_core.objectives import (
    DrawKey,
    LossSpec,
    ObjectiveConfig,
    adaptive_weighted,
    draw,
    imf_loss,
    loss_of_draws,
    sample_t_r,
)


def test_time_sampler_orders_and_shares():
    cfg = ObjectiveConfig(name="imf_boundary", boundary_share=0.5)
    t, r = sample_t_r(10_000, cfg, torch.Generator().manual_seed(0))
    assert (t >= r).all() and (0 < r).all() and (t < 1).all()
    assert (t == r).sum() == 5_000
    # logit-normal(-0.4, 1): the median of the larger of two draws sits above sigmoid(-0.4).
    assert t.median() > torch.sigmoid(torch.tensor(-0.4))
    t, r = sample_t_r(1000, ObjectiveConfig(name="fm"))
    assert (t == r).all()


def test_adaptive_weighting():
    err = torch.tensor([0.0, 1.0, 100.0], requires_grad=True)
    w = adaptive_weighted(err, ObjectiveConfig())
    torch.testing.assert_close(w, err.detach() / (err.detach() + 0.01))
    w.sum().backward()
    torch.testing.assert_close(err.grad, 1 / (err.detach() + 0.01))  # the weight is stop-gradient


def test_bad_objective_is_named():
    with pytest.raises(ValueError, match="objective.name"):
        ObjectiveConfig(name="imf")


def test_imf_aux_needs_an_aux_head():
    model = create("tiny", aux_head_depth=0)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="aux"):
        imf_loss(model, x, y, LossSpec(ObjectiveConfig(name="imf_aux"), GuidanceConfig(), 10))


@pytest.mark.parametrize("objective", ["fm", "mf", "imf_boundary", "imf_aux"])
@pytest.mark.parametrize("mode", ["none", "fixed", "omega", "omega_interval"])
def test_every_variant_gives_a_finite_loss_and_gradients(objective, mode):
    torch.manual_seed(0)
    model = create("tiny", width=32, depth=2, heads=2, aux_head_depth=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    fixed = dict(omega=1.0, kappa=0.5) if mode == "fixed" else {}  # MF's release setting
    spec = LossSpec(ObjectiveConfig(name=objective), GuidanceConfig(mode=mode, **fixed), 10)
    loss, parts = imf_loss(model, x, y, spec)
    loss.backward()
    assert torch.isfinite(loss)
    assert {"loss", "mse_u"} <= set(parts) and all(not p.requires_grad for p in parts.values())
    assert ("loss_v" in parts) == (objective == "imf_aux")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_ema_update_and_swap():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * before["weight"] + 0.1 * model.weight)
    live = model.weight.detach().clone()
    with ema.swap_in(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    torch.testing.assert_close(model.weight, live)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


@pytest.mark.parametrize("objective", ["mf", "imf_aux"])
def test_sharded_loss_equals_the_global_batch_loss(objective):
    # Two data-parallel ranks holding rows 0::2 and 1::2 (a DistributedSampler's split) see
    # the same noise as one process on the whole batch: equal mean loss and gradients.
    torch.manual_seed(0)
    model = create("tiny", width=32, depth=2, heads=2, aux_head_depth=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    spec = LossSpec(ObjectiveConfig(name=objective), GuidanceConfig(mode="omega_interval"), 10)

    def loss_and_grad(rows, shard):
        model.zero_grad()
        key = DrawKey(seed=7, step=3)
        loss, _ = imf_loss(model, x[rows], y[rows], spec, key=key, shard=shard)
        loss.backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        return loss.detach(), torch.cat(grads)

    full_loss, full_grad = loss_and_grad(slice(None), (0, 1))
    halves = [loss_and_grad(slice(rank, None, 2), (rank, 2)) for rank in (0, 1)]
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, full_loss)
    torch.testing.assert_close((halves[0][1] + halves[1][1]) / 2, full_grad, rtol=1e-4, atol=1e-6)


def test_warmup_in_epochs_becomes_steps():
    from imf_core.training import OptimConfig, lr_at, with_warmup_steps

    # Tab. 4 at paper scale: 10 epochs of 1,281,167 images x 2 (flips) at batch 1024.
    steps_per_epoch = -(-2 * 1_281_167 // 1024)
    optim = with_warmup_steps(OptimConfig(lr=1e-4, warmup_epochs=10), steps_per_epoch)
    assert optim.warmup_steps == 10 * steps_per_epoch == 25_030 and optim.warmup_epochs == 0
    assert lr_at(0, optim) == pytest.approx(1e-4 / 25_030)
    assert lr_at(25_029, optim) == pytest.approx(1e-4) and lr_at(10**6, optim) == 1e-4
    with pytest.raises(ValueError, match="not both"):
        OptimConfig(warmup_steps=5, warmup_epochs=1)
    with pytest.raises(ValueError, match="with_warmup_steps"):
        lr_at(0, OptimConfig(warmup_epochs=1))


def test_lr_cooldown_falls_linearly_to_zero_over_the_last_share_of_steps():
    from imf_core.training import OptimConfig, lr_at

    optim = OptimConfig(lr=3e-3, warmup_steps=50, decay_fraction=0.3)
    total = 3000  # decay over the last 900 steps: from step 2100 on
    assert lr_at(0, optim, total) == pytest.approx(3e-3 / 50)  # warmup unchanged
    assert lr_at(2100, optim, total) == pytest.approx(3e-3)
    assert lr_at(2550, optim, total) == pytest.approx(1.5e-3)
    assert lr_at(2999, optim, total) == pytest.approx(3e-3 / 900)
    assert lr_at(5000, OptimConfig(lr=1e-4), 0) == 1e-4  # the paper's constant lr needs no total
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, optim)
    with pytest.raises(ValueError, match="decay_fraction"):
        OptimConfig(decay_fraction=1.5)


@pytest.mark.parametrize("objective", ["fm", "mf", "imf_boundary", "imf_aux"])
@pytest.mark.parametrize("mode", ["fixed", "omega", "omega_interval"])
def test_the_guidance_reuses_the_training_forward_on_the_r_equals_t_rows(
    objective, mode, monkeypatch
):
    """The r = t rows' conditional velocity comes from the training forward (guided_target's
    v_c_known): loss and gradients equal the loss that computes every row's v_c in the no-grad
    pass, to float64 rounding, and that pass runs 2B - (r = t rows) rows instead of 2B."""
    import imf_core.objectives as objectives

    torch.manual_seed(0)
    model = create("tiny", width=32, depth=2, heads=2, aux_head_depth=1).double()
    with torch.no_grad():  # every weight random: a fresh model's zero outputs would hide a bug
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    fixed = dict(omega=1.5, kappa=0.5) if mode == "fixed" else {}
    guidance = GuidanceConfig(mode=mode, class_drop=0.3, **fixed)
    spec = LossSpec(ObjectiveConfig(name=objective), guidance, 10)
    draws = draw(x, y, spec, DrawKey(seed=1))
    assert draws.dropped.any() and draws.jvp_from > 0

    def run() -> tuple[dict, list]:
        model.zero_grad(set_to_none=True)
        loss, parts = loss_of_draws(model, x, y, draws, spec)
        loss.backward()
        return parts, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    rows: list[int] = []
    real = objectives.guided_target

    def counted(cfg_, v_fn, *args, **kwargs):
        return real(cfg_, lambda z, t, c: rows.append(len(z)) or v_fn(z, t, c), *args, **kwargs)

    monkeypatch.setattr(objectives, "guided_target", counted)
    parts, grads = run()
    assert rows == [2 * len(x) - draws.jvp_from]

    def every_row(*args, v_c_known=None, **kwargs):  # today's: no reuse
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives, "guided_target", every_row)
    ref_parts, ref_grads = run()
    for name, value in ref_parts.items():
        torch.testing.assert_close(parts[name], value, rtol=1e-12, atol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-15)
