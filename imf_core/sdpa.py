"""The SDPA kernel of the plain (non-JVP) attention passes: train.sdpa_backend.

    >>> with plain_attention("cudnn"):      # cuDNN first, the others behind it
    ...     loss = loss_of_draws(...)

"auto" leaves the choice to PyTorch. A named backend is tried first and the others stay
enabled behind it (flash, efficient, cuDNN, math, less the named one), so that a kernel that
refuses some inputs (flash has no float32, cuDNN no CPU) falls back instead of raising; "math"
is the math kernel alone. The CPU's choice ignores the order: flash whenever it is enabled.
The JVP pass is unaffected: meanflow.time_derivative runs under the math backend whatever the
setting (the fused kernels have no forward-mode AD rule, PITFALLS.md). Which backend is fastest
is measured by the GPU check (benchmarks/gpu_check.py, part "attention").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# The fallback behind a named backend, in this order.
DEFAULT_ORDER = ("flash", "efficient", "cudnn", "math")


def check_backend(name: str, setting: str = "sdpa_backend") -> str:
    """`name`, if it is "auto" or a backend of SDPA_BACKENDS; else an error naming `setting`."""
    if name != "auto" and name not in SDPA_BACKENDS:
        raise ValueError(f"{setting} must be one of {('auto', *SDPA_BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def plain_attention(name: str = "auto") -> Iterator[None]:
    """F.scaled_dot_product_attention within prefers the backend `name` ("auto": PyTorch's
    choice, nothing changed)."""
    if check_backend(name) == "auto":
        yield
        return
    # math alone is math: the CPU's choice ignores the priority order (flash whenever enabled)
    order = [name] if name == "math" else [name, *(b for b in DEFAULT_ORDER if b != name)]
    with sdpa_kernel([SDPA_BACKENDS[b] for b in order], set_priority=True):
        yield
