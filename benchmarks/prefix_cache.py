"""What the HF engine's prefix cache buys in agent rollouts: env steps/s with and without it, same episodes.

A batch of episodes is played in this process (one env per episode, one batched `next_turns` per step, as an
env actor does), greedy, once with `prefix_cache` on and once off; the two runs must write the same actions
(the cache is exact), and the figures are steps/s, their ratio, and the share of prompt tokens the cache
served. Without a cache each step re-reads the whole context twice (thought, then action), so the gain grows
with the episode's length and the context.

    python benchmarks/prefix_cache.py --model runs/replicate/alfworld-pool600/teacher   # a trained teacher
    python benchmarks/prefix_cache.py --env hotpotqa                                    # a tiny random model
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def play(engine, env_name: str, tasks: list[str], max_steps: int, max_new_tokens: int) -> tuple[list, int, float]:
    """All `tasks` at once, one batched turn per step; returns (actions per episode, env steps, seconds)."""
    import raysad_envs
    from raysad.policies.base import next_turns
    from raysad.agent_formats import get_format
    from raysad.segments import render_context

    envs = [raysad_envs.make(env_name, split="test", max_steps=max_steps) for _ in tasks]
    fmt = get_format(envs[0].unwrapped.agent_format)
    prompts = [env.unwrapped.prompt(env.reset(options={"task_id": t})[0], few_shot=0) for env, t in zip(envs, tasks)]
    turns = [[] for _ in tasks]
    live, steps, start = list(range(len(tasks))), 0, time.perf_counter()
    while live:
        new = next_turns(engine, [render_context(prompts[i], turns[i], fmt) for i in live],
                         [len(turns[i]) + 1 for i in live], fmt,
                         max_thought_tokens=max_new_tokens, max_action_tokens=max_new_tokens)
        still = []
        for i, turn in zip(live, new):
            turn.observation, _, terminated, truncated, _ = envs[i].step(turn.action)
            turns[i].append(turn)
            steps += 1
            if not (terminated or truncated):
                still.append(i)
        live = still
    return [[t.action for t in episode] for episode in turns], steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory with its tokenizer (default: a tiny random model)")
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--size", default="tiny-5m", help="size of the random model when no --model is given")
    parser.add_argument("--episodes", type=int, default=16, help="played together, one batch")
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="per segment (thought, action)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()

    import raysad_envs
    import torch

    from raysad.policies.hf import HFEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = raysad_envs.list_tasks(args.env, "test")[: args.episodes]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from rollout_throughput import build_teacher

            model_dir = build_teacher(args.env, args.size, Path(tmp))
        results = {}
        for cache in (0, 4 * args.episodes):
            engine = HFEngine(model_dir, batch_size=args.episodes, max_new_tokens=args.max_new_tokens,
                              prefix_cache=cache)
            results[cache] = play(engine, args.env, tasks, args.max_steps, args.max_new_tokens)
            reuse = engine.prefix_cache.stats()["reused_token_fraction"] if engine.prefix_cache else 0.0
            actions, steps, seconds = results[cache]
            print(f"prefix cache {'on ' if cache else 'off'}: {steps} steps in {seconds:6.1f} s = "
                  f"{steps / seconds:6.2f} steps/s; prompt tokens served from the cache: {reuse:.0%}", flush=True)
    (off_actions, off_steps, off_s), (on_actions, on_steps, on_s) = results.values()
    same = sum(a == b for a, b in zip(off_actions, on_actions))
    print(f"env {args.env}, model {args.model or 'random ' + args.size}, {args.episodes} episodes in one batch, "
          f"max_steps {args.max_steps}, {torch.get_num_threads()} threads")
    print(f"same actions in {same}/{len(tasks)} episodes; speed-up {(on_steps / on_s) / (off_steps / off_s):.2f}x")


if __name__ == "__main__":
    main()
