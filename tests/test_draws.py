"""A batch's random draws (objectives.draw): a function of (seed, step, global row) alone, so
that W ranks drawing their own rows draw exactly what one process draws for the whole batch,
whatever was drawn before (a run resumed on another number of ranks goes on with the same
stream), and a train_step reads nothing back from the device."""

import itertools

import pytest
import torch

from imf_core.ema import EMA
from imf_core.guidance import MODES, GuidanceConfig
from imf_core.models import create
from imf_core.objectives import (
    OBJECTIVES,
    DrawKey,
    Draws,
    LossSpec,
    ObjectiveConfig,
    draw,
    to_device,
)
from imf_core.training import OptimConfig, Runtime, make_optimizer, train_step


def batch(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def fields(d: Draws) -> list[torch.Tensor]:
    return [d.t, d.r, d.e, *d.cond, d.dropped]


def in_row_order(parts: list[Draws]) -> list[torch.Tensor]:
    """The ranks' draws put back at their global rows (rank r's row i is global row r + W i)."""
    world = len(parts)
    whole = []
    for k, first in enumerate(fields(parts[0])):
        rows = sum(len(fields(p)[k]) for p in parts)
        out = torch.empty(rows, *first.shape[1:], dtype=first.dtype)
        for rank, part in enumerate(parts):
            out[rank::world] = fields(part)[k]
        whole.append(out)
    return whole


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mode", "drop_rows"), [*itertools.product(MODES, ["first"]), ("omega_interval", "random")]
)
def test_the_ranks_draws_in_row_order_are_the_one_process_draws(mode, drop_rows):
    """W = 1, 2, 4 ranks, three steps, every guidance mode and label-drop rule: bit for bit.
    24 rows with a 0.3 share of r = t rows (7: not a multiple of W) and 30 % of labels dropped."""
    x, y = batch()
    extra = dict(omega=1.5, kappa=0.5) if mode == "fixed" else {}
    guidance = GuidanceConfig(mode=mode, drop_rows=drop_rows, class_drop=0.3, **extra)
    for objective, step in itertools.product(OBJECTIVES, range(3)):
        spec = LossSpec(ObjectiveConfig(name=objective, boundary_share=0.3), guidance, 10)
        key = DrawKey(seed=5, step=step)
        whole = draw(x, y, spec, key)
        assert whole.jvp_from == (24 if objective == "fm" else 7)
        for world in (1, 2, 4):
            parts = [draw(x[r::world], y[r::world], spec, key, (r, world)) for r in range(world)]
            assert_same(in_row_order(parts), fields(whole))
            assert sum(p.jvp_from for p in parts) == whole.jvp_from
    assert whole.dropped.any() and (whole.cond.y[whole.dropped] == 10).all()


def test_a_steps_draws_do_not_depend_on_what_was_drawn_before():
    """Step 3 on rank 1 of 4, drawn first, after steps 0-2 on 2 ranks, or with the global RNG
    elsewhere: the same as one process's rows 1::4 at step 3. Another step or seed: others."""
    x, y = batch()
    spec = LossSpec(ObjectiveConfig(), GuidanceConfig(), 10)
    key = DrawKey(seed=1, step=3)
    first = fields(draw(x[1::4], y[1::4], spec, key, (1, 4)))
    for step in range(3):
        for rank in range(2):
            draw(x[rank::2], y[rank::2], spec, DrawKey(1, step), (rank, 2))
    torch.manual_seed(123)
    torch.randn(100)
    again = fields(draw(x[1::4], y[1::4], spec, key, (1, 4)))
    whole = fields(draw(x, y, spec, key))
    assert_same(first, again)
    assert_same(first, [f[1::4] for f in whole])
    for other in (DrawKey(1, 4), DrawKey(2, 3)):
        e = draw(x, y, spec, other).e
        assert not torch.isclose(e, whole[2]).any()


def test_a_rank_draws_the_noise_of_its_own_rows_alone(monkeypatch):
    """The O(B C S S) part: the streams a rank seeds are its rows' (and the step's own)."""
    seeded = []
    stream = DrawKey.stream

    def spy(self, row=None):
        seeded.append(row)
        return stream(self, row)

    monkeypatch.setattr(DrawKey, "stream", spy)
    x, y = batch(32)
    draw(x[3::8], y[3::8], LossSpec(ObjectiveConfig(), GuidanceConfig(), 10), DrawKey(), (3, 8))
    assert seeded == [None, *range(3, 32, 8)]


def test_each_rows_noise_is_standard_normal_and_independent():
    x, y = torch.zeros(512, 4, 8, 8), torch.zeros(512, dtype=torch.long)
    spec = LossSpec(ObjectiveConfig(), GuidanceConfig(), 10)
    e = draw(x, y, spec, DrawKey(0, 7)).e.double()
    flat = e.flatten()  # 131,072 values
    assert abs(flat.mean()) < 0.015 and abs(flat.std() - 1) < 0.01
    assert abs((flat**4).mean() - 3) < 0.06  # normal kurtosis
    rows = e.flatten(1)
    corr = torch.corrcoef(rows)[~torch.eye(512, dtype=torch.bool)]
    # 256 values a row: sd 1/16 a pair; no two rows share a stream (that would be 1)
    assert corr.abs().max() < 0.5 and abs(corr.mean()) < 0.005


def test_draws_go_to_the_device_in_one_buffer_of_their_dtypes():
    """On the CPU nothing is copied; elsewhere the floats and the bool mask keep their dtypes and
    shapes through the one packed copy (the values: the GPU check; meta has none)."""
    t, mask = torch.rand(3), torch.tensor([True, False, True])
    noise = torch.randn(3, 2, 2)
    tensors = [t, noise, mask]
    on_cpu = to_device(tensors, torch.device("cpu"))
    assert all(a is b for a, b in zip(on_cpu, tensors, strict=True))
    moved = to_device(tensors, torch.device("meta"))
    assert [(m.device.type, m.dtype, m.shape) for m in moved] == [
        ("meta", torch.float32, (3,)),
        ("meta", torch.float32, (3, 2, 2)),
        ("meta", torch.bool, (3,)),
    ]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_train_step_reads_nothing_back_from_the_device(objective):
    """On the meta device every read of a value on the host (.cpu(), .item(), .tolist(), bool())
    raises: a whole train_step there -- draws, guidance, JVP, backward, clipping, AdamW, EMA,
    accumulated over micro-batches -- proves the step queues its work without one sync."""
    with pytest.raises(NotImplementedError):
        torch.zeros(1, device="meta").cpu()
    with pytest.raises(RuntimeError):
        torch.zeros(1, device="meta").item()
    model = create("tiny", width=32, depth=1, heads=2, aux_head_depth=1, device="meta")
    optim = OptimConfig(lr=1e-3, grad_clip=1.0, warmup_steps=2)
    optimizer, ema = make_optimizer(model, optim), EMA(model, 0.5)
    x, y = torch.empty(8, 1, 8, 8, device="meta"), torch.empty(8, dtype=torch.long, device="meta")
    for mode in MODES:
        extra = dict(omega=1.5, kappa=0.5) if mode == "fixed" else {}
        parts = train_step(
            model,
            optimizer,
            ema,
            x,
            y,
            LossSpec(ObjectiveConfig(name=objective), GuidanceConfig(mode=mode, **extra), 10),
            3,
            optim,
            runtime=Runtime(micro_batch=4),
        )
        assert {v.device.type for v in parts.values()} == {"meta"} and "grad_norm" in parts
