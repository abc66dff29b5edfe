"""Env steps/s: the Ray rollout pool (batched engine requests) against a one-episode-at-a-time loop.

The sequential loop is what the ReAct scripts do: one env, one prompt per generate call, in this process.
The pool is `raysad rollout`: env actors stepping `--envs` environments in all, one HF engine actor that merges
their requests into batches. Same teacher (a tiny random model built from config, so the actions are mostly
invalid and episodes run to --max-turns: the cost per step is what is compared), same env and tasks.

    python benchmarks/rollout_throughput.py                       # 32 envs = 4 actors x 8
    python benchmarks/rollout_throughput.py --envs 8 --env-actors 2 --size tiny-5m

Reading the figures: the pool line also prints the engine's prompts per call and how busy it was. When that is
32 and ~100%, the pool is doing its job and the ratio is the engine's own batch scaling: on a CPU a tiny model
at batch 1 is overhead-bound (flat in context length) while batch 32 is compute-bound (grows with it), so the
ratio falls as contexts grow (HFEngine, 1 thread, 32 new tokens: ~7x at 130 context tokens, ~4x at 400, ~2x
at 800). On a GPU, batched decoding is nearly free and the ratio approaches the batch size.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build_teacher(env_name: str, size: str, root: Path) -> str:
    """A tiny model whose tokenizer is trained on the env's prompts and expert transcripts."""
    import raysad_envs
    from raysad import models

    env = raysad_envs.make(env_name, split="train")
    texts = []
    for task_id in raysad_envs.list_tasks(env_name, "train")[:20]:
        obs, _ = env.reset(options={"task_id": task_id})
        texts.append(env.unwrapped.prompt(obs, few_shot=1))
        for _ in range(5):
            thought, action = env.unwrapped.expert_turn()
            obs, _, terminated, truncated, _ = env.step(action)
            texts.append(f"{thought}\n{action}\n{obs}\n")
            if terminated or truncated:
                break
    models.train_tokenizer(texts, vocab_size=2048, out_dir=root / "tok")
    return str(models.init_model_dir(size, root / "tok", root / "teacher"))


def sequential(env_name: str, model_dir: str, tasks: list[str], args) -> tuple[int, int, float]:
    """One episode at a time, one prompt per generate call; returns (env steps, tokens generated, seconds)."""
    import raysad_envs
    from raysad.policies.base import next_turns
    from raysad.policies.hf import HFEngine
    from raysad.agent_formats import get_format
    from raysad.segments import render_context

    engine = HFEngine(model_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
    env = raysad_envs.make(env_name, split="test", max_steps=args.max_turns)
    fmt = get_format(env.unwrapped.agent_format)
    steps, tokens, start = 0, 0, time.perf_counter()
    for task_id in tasks:
        obs, _ = env.reset(options={"task_id": task_id})
        prompt, turns, done = env.unwrapped.prompt(obs, few_shot=0), [], False
        while not done:
            [turn] = next_turns(engine, [render_context(prompt, turns, fmt)], [len(turns) + 1], fmt,
                                max_thought_tokens=args.max_new_tokens, max_action_tokens=args.max_new_tokens)
            turn.observation, _, terminated, truncated, _ = env.step(turn.action)
            turns.append(turn)
            steps, tokens = steps + 1, tokens + len(turn.token_ids or ())
            done = terminated or truncated
    return steps, tokens, time.perf_counter() - start


def pool(env_name: str, model_dir: str, tasks: list[str], args, out: Path) -> tuple[int, int, float, float]:
    """The Ray pool; returns (env steps, tokens generated, seconds of the run, seconds with actor start-up)."""
    from raysad.rollout import RolloutConfig, run_rollout

    start = time.perf_counter()
    cfg = RolloutConfig(env=env_name, split="test", task_ids=tasks, policy="hf", model=model_dir,
                        max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        env_actors=args.env_actors,
                        envs_per_actor=args.envs // args.env_actors, engine_batch_size=args.envs,
                        cpus_per_engine=args.threads, out=str(out))
    summary = run_rollout(cfg, progress=False, track=False)
    m = summary.metrics()
    print(f"  pool: {m['rollout/engine_mean_batch']:.1f} prompts per engine call, engine busy "
          f"{m['rollout/engine_busy_frac']:.0%} of the run", flush=True)
    return summary.steps, summary.tokens_generated, summary.wall_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="hotpotqa")
    parser.add_argument("--size", default="tiny-1m", help="tiny model size (raysad.models.TINY_SIZES)")
    parser.add_argument("--envs", type=int, default=32, help="parallel environments in the pool")
    parser.add_argument("--env-actors", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=64, help="episodes the pool plays")
    parser.add_argument("--seq-tasks", type=int, default=6, help="episodes the sequential loop plays")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling: a random model then writes a stop string after ~20 tokens, as a teacher "
                             "would (greedy, it repeats one token: a stop at once, or never)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the teacher, in both set-ups")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternate the two set-ups this many times and keep each one's best (a shared machine)")
    args = parser.parse_args()

    import ray
    import raysad_envs
    import torch

    torch.set_num_threads(args.threads)
    # the engine actor gets the CPUs the sequential loop had (its torch threads); env actors share what is left
    ray.init(include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})

    tasks = raysad_envs.list_tasks(args.env, "test")[: args.tasks]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_teacher(args.env, args.size, Path(tmp))
        seq_runs, pool_runs = [], []
        for r in range(args.repeats):
            seq_runs.append(sequential(args.env, model_dir, tasks[: args.seq_tasks], args))
            pool_runs.append(pool(args.env, model_dir, tasks, args, Path(tmp) / f"trajs{r}.jsonl"))
            print(f"run {r}: sequential {seq_runs[-1][0] / seq_runs[-1][2]:.2f} steps/s, "
                  f"pool {pool_runs[-1][0] / pool_runs[-1][2]:.2f} steps/s", flush=True)
    ray.shutdown()
    seq_steps, seq_tokens, seq_s = max(seq_runs, key=lambda run: run[0] / run[2])
    pool_steps, pool_tokens, pool_s, pool_total_s = max(pool_runs, key=lambda run: run[0] / run[2])
    seq_rate, pool_rate = seq_steps / seq_s, pool_steps / pool_s
    print(f"env {args.env}, teacher {args.size} (hf, CPU, {torch.get_num_threads()} threads), "
          f"max_turns {args.max_turns}, max_new_tokens {args.max_new_tokens} per segment")
    print(f"sequential (1 env, 1 prompt per call): {seq_steps:4d} steps in {seq_s:6.1f} s = {seq_rate:6.2f} steps/s"
          f"  ({seq_tokens / seq_steps:.1f} tokens/step)")
    print(f"ray pool ({args.env_actors} actors x {args.envs // args.env_actors} envs, 1 engine): {pool_steps:4d} steps "
          f"in {pool_s:6.1f} s = {pool_rate:6.2f} steps/s  ({pool_tokens / pool_steps:.1f} tokens/step; "
          f"{pool_total_s:.1f} s with actor start-up)")
    print(f"best of {args.repeats} runs each")
    print(f"speed-up: {pool_rate / seq_rate:.1f}x")


if __name__ == "__main__":
    main()
