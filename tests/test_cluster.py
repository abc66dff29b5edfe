"""The local Ray that init_ray starts: its workers, and the detached actors they start (as Ray Train's
placement-group cleaner is), run the setup hook that silences the cleaner's once-a-second warning."""
from __future__ import annotations

import logging

import ray

from raysad.cluster import _NOISY_WITHOUT_DASHBOARD, init_ray


@ray.remote(num_cpus=0)
class LevelProbe:
    def level(self) -> int:
        return logging.getLogger(_NOISY_WITHOUT_DASHBOARD).getEffectiveLevel()

    def detached_level(self) -> int:
        # what Ray Train's controller does: a detached actor started from inside another actor
        child = LevelProbe.options(lifetime="detached").remote()
        try:
            return ray.get(child.level.remote())
        finally:
            ray.kill(child)


def test_local_ray_workers_silence_the_cleaner_warning_only():
    if ray.is_initialized():  # another module's Ray: this test needs the one init_ray starts
        ray.shutdown()
    assert init_ray(num_cpus=1) is True
    try:
        probe = LevelProbe.remote()
        assert ray.get(probe.level.remote()) == logging.ERROR
        assert ray.get(probe.detached_level.remote()) == logging.ERROR
        # the driver's own logging is left alone
        assert logging.getLogger(_NOISY_WITHOUT_DASHBOARD).getEffectiveLevel() != logging.ERROR
        assert init_ray() is False  # a running Ray is reused, not restarted
    finally:
        ray.shutdown()
