"""How many tokens the scripted experts' thoughts and actions take, per env: what the default token budgets
(env.token_budget, used by rollout/evaluate when --max-new-tokens is not given) must hold.

    python benchmarks/expert_token_lengths.py --tokenizer models/smollm2-135m-instruct --episodes 300

A segment is counted as an engine writes it: the prefix's lead space, the text and its end delimiter
(encoding.encode_trajectory's reason / act tokens). Prints max, p99 and mean per env and segment, and the
budget each env declares next to it.
"""
from __future__ import annotations

import argparse

import numpy as np


def expert_segments(env_name: str, episodes: int, split: str, data: str | None = None) -> list:
    """Expert trajectories (as Trajectory objects) of the first `episodes` tasks of a split, played in-process."""
    import raysad_envs
    from raysad.trajectory import Trajectory, Turn

    env = raysad_envs.make(env_name, split=split, **({"data": data} if data else {}))
    out = []
    for task_id in env.unwrapped.task_ids()[:episodes]:
        obs, info = env.reset(options={"task_id": task_id})
        prompt, turns, done = env.unwrapped.prompt(obs), [], False
        while not done:
            thought, action = env.unwrapped.expert_turn()
            obs, _, terminated, truncated, _ = env.step(action)
            turns.append(Turn(thought, action, obs))
            done = terminated or truncated
        out.append(Trajectory(id=task_id, env=env_name, task_id=task_id, split=split, instruction="", prompt=prompt,
                              turns=turns, reward=0.0, success=False, policy={"backend": "expert"}))
    return out, env.unwrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (e.g. a converted SmolLM2)")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--split", default="train")
    parser.add_argument("--envs", default="hotpotqa,webshop,alfworld")
    parser.add_argument("--data", default=None, help="real data path (one env)")
    args = parser.parse_args()

    from raysad.models import load_tokenizer
    from raysad.encoding import encode_trajectory

    tokenizer = load_tokenizer(args.tokenizer)
    print(f"tokenizer {args.tokenizer} ({len(tokenizer)} ids), {args.episodes} expert episodes per env ({args.split})")
    for name in args.envs.split(","):
        trajs, env = expert_segments(name, args.episodes, args.split, args.data)
        lengths = {"thought": [], "action": []}
        for traj in trajs:
            ex = encode_trajectory(traj, tokenizer)
            for kind, mask in (("thought", ex["reason_mask"]), ("action", ex["act_mask"])):
                edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
                lengths[kind] += list(edges[1::2] - edges[::2])
        budget = getattr(env, "token_budget", None)
        for j, kind in enumerate(("thought", "action")):
            v = np.asarray(lengths[kind])
            print(f"{name:9s} {kind:7s}: n {len(v):5d}  max {v.max():4d}  p99 {np.percentile(v, 99):6.1f}  "
                  f"mean {v.mean():6.1f}   budget {budget[j] if budget else '-'}")


if __name__ == "__main__":
    main()
