"""`generate` for engines that answer one call in slices of `batch_size` prompts (hf, openai): the call's settings
(base.call_settings: the engine's defaults, a seed per call), then `_generate_batch` on each slice, in order."""
from __future__ import annotations

from raysad.policies.base import Generation, call_settings


class BatchedEngine:
    """Base of an engine with `batch_size`, the attributes call_settings reads (max_new_tokens, temperature,
    seed, calls) and `_generate_batch(prompts, stop, max_tokens, topk, temperature, seed)`."""

    batch_size: int

    def generate(self, prompts: list[list[int]], stop: list[str] | None = None, max_tokens: int | None = None,
                 topk: int = 0, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        stop, max_tokens, temperature, seed = call_settings(self, stop, max_tokens, temperature, seed)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._generate_batch(prompts[start:start + self.batch_size], stop, max_tokens, topk,
                                        temperature, seed)
        return out

    def _generate_batch(self, prompts: list[list[int]], stop: list[str], max_tokens: int, topk: int,
                        temperature: float, seed: int | None) -> list[Generation]:
        raise NotImplementedError
