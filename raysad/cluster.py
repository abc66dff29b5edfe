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
    # "local": always a fresh Ray of our own, never another user's that happens to run on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": "raysad.cluster.quiet_local_workers"})
    return True


# Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, whether the trainer still
# runs. Without a dashboard it cannot tell, so it never cleans anything and warns about once a second for the
# whole run instead: silencing it loses nothing.
_NOISY_WITHOUT_DASHBOARD = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_workers() -> None:
    """Runs in every worker process of a local Ray (worker_process_setup_hook)."""
    logging.getLogger(_NOISY_WITHOUT_DASHBOARD).setLevel(logging.ERROR)


def check_custom_resources(field: str, resources: dict[str, float]) -> None:
    """Custom resources that pin actors or workers to a node type (cluster.yaml's `teacher_engine`, `trainer`):
    names other than Ray's own CPU/GPU/memory (those have their own fields), amounts >= 0."""
    builtin = {"CPU", "GPU", "memory", "object_store_memory"}
    for name, amount in resources.items():
        if name in builtin:
            raise ValueError(f"field '{field}': {name} has its own field (cpus_/gpus_...); give custom resources "
                             f"here, e.g. teacher_engine=1")
        if amount < 0:
            raise ValueError(f"field '{field}': {name} must be >= 0, got {amount}")
