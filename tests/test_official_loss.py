"""Our iMF loss against the authors' training code: loss and gradients on injected draws.

tests/fixtures/official_loss/ (its README says how it was made) holds the
official JAX training step's loss and weight gradients, in float64, for a tiny network whose
every random draw was injected. The same network, batch and draws through our loss
(objectives.loss_of_draws: the guidance passes, the JVP on the r != t rows, the aux head, the
adaptive weighting) must give the same numbers to float64 rounding. It protects the method
through every change to the loss, the JVP, the guidance passes and the draws' transforms.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from imf_core.guidance import Conditions, GuidanceConfig
from imf_core.objectives import Draws, LossSpec, ObjectiveConfig, loss_of_draws

FIXTURES = Path(__file__).parent / "fixtures" / "official_loss"
NUM_CLASSES = 5  # the null class is 5
WEIGHTS = ("W1", "b1", "Wc", "E", "W2u", "W3u", "W2v")


class TinyOfficialNet(nn.Module):
    """The fixture's network (README): z NCHW here, flattened per row in NHWC order as there.

    c = [t, h, 1 - 1/omega, t_min, t_max, sin(3t) h]; a = tanh(z W1 + c Wc + E[y] + b1);
    u = a W2u + (a*a) W3u (t + h^2); v = a W2v.
    """

    has_aux_head = True

    def __init__(self, data: dict[str, np.ndarray]):
        super().__init__()
        for name in WEIGHTS:
            self.register_parameter(name, nn.Parameter(torch.from_numpy(data[name]).clone()))

    def forward(
        self, z: Tensor, t: Tensor, h: Tensor, cond: Conditions, heads: str = "u", jvp=False
    ):
        b, ch, s, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b, -1)
        c = torch.stack(
            [t, h, 1 - 1 / cond.omega, cond.t_min, cond.t_max, torch.sin(3 * t) * h], dim=1
        )
        a = torch.tanh(flat @ self.W1 + c @ self.Wc + self.E[cond.y] + self.b1)

        def image(rows: Tensor) -> Tensor:
            return rows.reshape(b, s, s, ch).permute(0, 3, 1, 2)

        u = image(a @ self.W2u + (a * a) @ self.W3u * (t + h**2)[:, None])
        v = image(a @ self.W2v)
        return {"u": u, "v": v, "uv": (u, v)}[heads]


def official_draws(data: dict[str, np.ndarray]) -> tuple[Draws, Tensor]:
    """The README's transforms of the injected numbers into our Draws (and the labels)."""
    n = len(data["y"])
    t0, r0 = (torch.sigmoid(torch.from_numpy(data[k]) - 0.4) for k in ("n_t", "n_r"))
    t, r = torch.maximum(t0, r0), torch.minimum(t0, r0)
    jvp_from = n // 2  # the first 50 % of rows get r = t
    r[:jvp_from] = t[:jvp_from]
    y = torch.from_numpy(data["y"])
    num_drop = int((torch.from_numpy(data["u_drop_aligned"]) < 0.1).sum())
    dropped = torch.arange(n) < num_drop  # the official code drops the first num_drop rows
    boundary = torch.arange(n) < jvp_from
    cond = Conditions(
        torch.where(dropped, NUM_CLASSES, y),
        8.0 ** torch.from_numpy(data["u_omega"]),
        torch.where(boundary, 0.0, 0.5 * torch.from_numpy(data["u_tmin"])),
        torch.where(boundary, 1.0, 0.5 + 0.5 * torch.from_numpy(data["u_tmax"])),
    )
    e = torch.from_numpy(data["e"]).permute(0, 3, 1, 2)
    return Draws(t, r, e, cond, dropped, jvp_from), y


def test_loss_and_gradients_equal_the_official_training_code():
    data = dict(np.load(FIXTURES / "data.npz"))
    official = dict(np.load(FIXTURES / "official_imf_aux_omega_interval.npz"))
    model = TinyOfficialNet(data)
    draws, y = official_draws(data)
    assert draws.dropped.sum() == 2  # rows 0 and 1, as the README says
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2)
    spec = LossSpec(ObjectiveConfig(), GuidanceConfig(), NUM_CLASSES)
    loss, parts = loss_of_draws(model, x, y, draws, spec)
    loss.backward()
    assert float(parts["loss"]) == pytest.approx(float(official["loss"]), rel=1e-12)
    assert float(parts["mse_u"]) == pytest.approx(float(official["loss_u_mse"]), rel=1e-12)
    assert float(parts["mse_v"]) == pytest.approx(float(official["loss_v_mse"]), rel=1e-12)
    for name in WEIGHTS:
        torch.testing.assert_close(
            getattr(model, name).grad,
            torch.from_numpy(official[f"g_{name}"]),
            rtol=1e-12,
            atol=1e-14,
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )
