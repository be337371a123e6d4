"""Where Ray work runs: a cluster named by address, or a local Ray started on demand."""

from __future__ import annotations

import math
import os
import threading

_lock = threading.Lock()  # sweeps start stages from several threads


def connect_ray(address: str, cpus_needed: float) -> None:
    """Joins the Ray cluster at `address` ("" = start a local one with at least `cpus_needed`
    CPUs, so fractional workers fit on a small machine; the dashboard stays off, it would bind
    a port). An already initialised Ray is kept."""
    import ray

    with _lock:
        if ray.is_initialized():
            return
        if address:
            ray.init(address=address)
        else:  # a new local Ray ("local": never join one another process started here)
            cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
            ray.init(address="local", include_dashboard=False, num_cpus=cpus)
