"""train.sdpa_backend: the plain passes' SDPA kernel, chosen at run time, out of the run's key."""

import pytest
import torch
from torch.nn.attention import SDPBackend

from imf_core.sdpa import SDPA_BACKENDS, check_backend, plain_attention


def chosen_kernel(q: torch.Tensor) -> SDPBackend:
    return SDPBackend(torch._fused_sdp_choice(q, q, q))


def test_a_named_backend_is_chosen_and_restored_after():
    q = torch.randn(2, 2, 8, 16)
    before = chosen_kernel(q)
    with plain_attention("math"):
        assert chosen_kernel(q) == SDPBackend.MATH
    with plain_attention("flash"):
        assert chosen_kernel(q) == SDPBackend.FLASH_ATTENTION
    with plain_attention("cudnn"):  # no cuDNN kernel on the CPU: the fallback, not an error
        assert chosen_kernel(q) == SDPBackend.FLASH_ATTENTION
    assert chosen_kernel(q) == before
    with pytest.raises(ValueError, match="train.sdpa_backend must be one of"):
        check_backend("fast", "train.sdpa_backend")


def test_the_backend_changes_no_step_and_the_jvp_pass_still_runs():
    """A step under each backend the CPU has (flash, math): the same loss and gradients to float
    rounding, and the JVP pass (math attention inside, whatever the setting) runs."""
    from imf_core.guidance import GuidanceConfig
    from imf_core.models import create
    from imf_core.objectives import LossSpec, ObjectiveConfig
    from imf_core.training import OptimConfig, Runtime, make_optimizer, train_step

    grads = {}
    for backend in ("flash", "math", "auto"):
        torch.manual_seed(0)
        model = create("tiny", depth=1, aux_head_depth=1, width=32, heads=2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        shape = (8, model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(shape, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        optim = OptimConfig(lr=0.0)
        parts = train_step(
            model,
            make_optimizer(model, optim),
            None,
            x,
            y,
            LossSpec(
                ObjectiveConfig(name="imf_aux"),
                GuidanceConfig(mode="omega_interval"),
                model.cfg.num_classes,
            ),
            0,
            optim,
            seed=2,
            runtime=Runtime(sdpa_backend=backend),
        )
        grads[backend] = (parts["loss"], torch.cat([p.grad.flatten() for p in model.parameters()]))
    for backend in ("math", "auto"):
        torch.testing.assert_close(grads[backend][0], grads["flash"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[backend][1], grads["flash"][1], rtol=1e-4, atol=1e-6)
    assert set(SDPA_BACKENDS) == {"flash", "efficient", "cudnn", "math"}
