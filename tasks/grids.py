"""Sample grids a person looks at: a fixed set of classes, one row each, and fixed noise, so
the same grid compares across training steps, CFG points and variants.

    >>> noise, y = grid_inputs(num_classes=1000, shape=(4, 32, 32), per_class=8, seed=0)
    >>> picture = decoded_grid(model, tokenizer, noise, y, omega=2.0, per_class=8, title="...")

Latent data decode through the precompute's tokenizer (the SD-VAE at `tokenizer.path`), pixel
data pass through unchanged; both are converted to uint8 as evaluation converts samples.
Training (tasks.train_loop, every `train.sample_every` steps) and evaluation (tasks.evaluate, one
grid per CFG point) draw theirs here.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from imf_core.guidance import generate
from tasks.features import to_uint8
from tasks.storage import Output

GRID_ROWS = 10  # classes shown: all of them up to 10, else 10 spread evenly over the labels


def grid_classes(num_classes: int, rows: int = GRID_ROWS) -> torch.Tensor:
    """The classes of a grid's rows: 0..K-1 when K <= rows, else `rows` evenly spread labels
    (ImageNet: 0, 111, 222, ..., 999), the same for every run on that data."""
    if num_classes <= rows:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()


def grid_inputs(
    num_classes: int, shape: tuple[int, ...], per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, labels) of a grid: `per_class` samples of each grid class, noise from `seed`."""
    y = grid_classes(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(y), *shape, generator=torch.Generator().manual_seed(seed))
    return noise, y


def point_title(omega: float, interval: list[float] | tuple[float, float]) -> str:
    return f"omega {omega:g}, interval [{interval[0]:g}, {interval[1]:g}]"


@torch.no_grad()
def decoded_grid(
    model: torch.nn.Module,
    tokenizer,
    noise: torch.Tensor,
    y: torch.Tensor,
    omega: float,
    per_class: int,
    title: str,
    interval: tuple[float, float] = (0.0, 1.0),
    nfe: int = 1,
):
    """Samples of `model` at one CFG point, decoded, as a labelled PIL image."""
    x = generate(model, noise, y, omega, interval[0], interval[1], nfe)
    images = to_uint8(tokenizer.decode(x))
    return labelled_grid(images, per_class, title, y[::per_class].tolist())


def labelled_grid(
    images: torch.Tensor, per_row: int, title: str, classes: list[int], min_side: int = 256
):
    """uint8 images (N, C, H, W), one class per row -> a PIL image enlarged by an integer factor
    (nearest neighbour: pixels stay pixels) to at least `min_side` per side, with the class
    of each row on the left and `title` (the CFG point, the step) on top."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    grid = make_grid(images.cpu().float() / 255, nrow=per_row, padding=1, pad_value=0.5)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    scale = max(1, -(-min_side // min(picture.size)))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    margin, top = 64, 20
    canvas = Image.new("RGB", (picture.width + margin, picture.height + top), "white")
    canvas.paste(picture.convert("RGB"), (margin, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    row_height = picture.height / len(classes)
    for k, label in enumerate(classes):
        draw.text((4, top + k * row_height + row_height / 2 - 5), f"class {label}", fill="black")
    return canvas


def save_figure(fig, out: Output, name: str) -> str:
    """A matplotlib figure as the PNG `name` of `out` (written whole or not at all), then
    closed; returns the name."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    out.write_bytes(name, buffer.getvalue())
    return name


def png_bytes(picture) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="png")
    return buffer.getvalue()
