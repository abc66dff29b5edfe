"""Ray set-up in one place: join the cluster a config or $RAY_ADDRESS names, else start a local Ray."""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray; True if a local Ray was started here (the caller then shuts it down).

    A local Ray 2.5x+ generates its own auth token (~/.ray/auth_token); on a cluster the token must already be
    where the head put it (`ray up` does this) or in $RAY_AUTH_TOKEN."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True
