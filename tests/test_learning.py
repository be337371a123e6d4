"""A short CPU training run on digits: the iMF loss falls and 1-NFE samples carry their class."""

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from imf_core.ema import EMA
from imf_core.guidance import GuidanceConfig, generate
from imf_core.models import create
from imf_core.objectives import LossSpec, ObjectiveConfig
from imf_core.training import OptimConfig, make_optimizer, train_step
from tasks.datasets import digits


@pytest.mark.slow
def test_imf_learns_digits_in_one_step():
    torch.manual_seed(0)
    images, labels = digits()
    model = create("tiny", aux_head_depth=0, cond_omega=False, cond_interval=False)
    spec = LossSpec(ObjectiveConfig(name="imf_boundary"), GuidanceConfig(mode="none"), 10)
    optim = OptimConfig(lr=2e-3, warmup_steps=50, ema_decay=0.99)
    optimizer, ema = make_optimizer(model, optim), EMA(model, optim.ema_decay)
    gen = torch.Generator().manual_seed(0)
    mse = []
    for step in range(500):
        idx = torch.randint(0, len(images), (64,), generator=gen)
        parts = train_step(model, optimizer, ema, images[idx], labels[idx], spec, step, optim)
        mse.append(parts["mse_u"].item())
    first, last = sum(mse[:20]) / 20, sum(mse[-50:]) / 50
    assert last < 0.5 * first, (first, last)  # unweighted ||V - (e - x)||^2

    classifier = LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())
    y = torch.arange(10).repeat(20)
    noise = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with ema.swap_in(model):
        samples = generate(model, noise, y).clamp(-1, 1)
    accuracy = (classifier.predict(samples.flatten(1).numpy()) == y.numpy()).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.1
