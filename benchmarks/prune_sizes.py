"""Figures for `raysad prune`: parameters before/after and time taken, for tiny-5m / tiny-20m at a few ratios,
with magnitude and taylor importance (calibration on expert HotPotQA trajectories generated here).

    python benchmarks/prune_sizes.py [--sizes tiny-5m,tiny-20m] [--ratios 0.25,0.5] [--episodes 16]
                                     [--importance magnitude,taylor] [--device cpu]

Models are randomly initialised (pruning cost and sizes do not depend on training); perplexities are printed
but mean little for untrained models. Nothing is logged to MLflow.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def expert_trajectories(path: Path, episodes: int) -> None:
    import raysad_envs
    from raysad.trajectory import Trajectory, Turn
    from raysad.trajectory_writer import TrajectoryWriter

    env = raysad_envs.make("hotpotqa", split="train")
    with TrajectoryWriter(path) as writer:
        for n, task_id in enumerate(raysad_envs.list_tasks("hotpotqa", "train")[:episodes]):
            observation, info = env.reset(seed=n, options={"task_id": task_id})
            prompt, turns, reward, done = env.unwrapped.prompt(observation), [], 0.0, False
            while not done:
                thought, action = env.unwrapped.expert_turn()
                observation, reward, terminated, truncated, info = env.step(action)
                turns.append(Turn(thought, action, observation))
                done = terminated or truncated
            writer.write(Trajectory(id=f"e{n}", env="hotpotqa", task_id=task_id, split="train",
                                    instruction="", prompt=prompt, turns=turns, reward=float(reward),
                                    success=bool(info.get("success")), policy={"backend": "expert"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny-5m,tiny-20m")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--importance", default="magnitude,taylor")
    parser.add_argument("--episodes", type=int, default=16, help="expert trajectories for calibration")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from raysad import models
    from raysad.prune import PruneConfig, run_prune
    from raysad.sft import train_tokenizer_from_trajectories

    work = Path(tempfile.mkdtemp(prefix="raysad-prune-bench-"))
    data = work / "expert.jsonl"
    expert_trajectories(data, args.episodes)
    tokenizer = train_tokenizer_from_trajectories(data, vocab_size=4096)
    print(f"{'model':9} {'ratio':>5} {'importance':10} {'params before':>13} {'params after':>12} {'removed':>7} "
          f"{'mlp':>9} {'heads/kv':>9} {'seconds':>7}")
    for size in args.sizes.split(","):
        model_dir = models.init_model_dir(size, models.save_tokenizer(tokenizer, work / "tok"), work / size)
        for ratio in map(float, args.ratios.split(",")):
            for importance in args.importance.split(","):
                started = time.perf_counter()
                r = run_prune(PruneConfig(model=str(model_dir), out=str(work / f"{size}-{ratio}-{importance}"),
                                          ratio=ratio, importance=importance, trajectories=str(data),
                                          calibration_batches=2, device=args.device),
                              track=False, progress=False)
                seconds = time.perf_counter() - started
                before, after = r["shape_before"], r["shape_after"]
                print(f"{size:9} {ratio:5.2f} {importance:10} {r['params_before']:13,} {r['params_after']:12,} "
                      f"{r['fraction_removed']:7.1%} {before['intermediate_size']:>4}>{after['intermediate_size']:<4} "
                      f"{before['num_attention_heads']}/{before['num_key_value_heads']}>{after['num_attention_heads']}/"
                      f"{after['num_key_value_heads']:<3} {seconds:7.2f}")


if __name__ == "__main__":
    main()
