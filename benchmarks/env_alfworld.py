"""Figures for the ALFWorld environment: generating and compiling games, expert success, steps per episode,
time per reset and per step; optionally a planner check that generated games are solvable.

    python benchmarks/env_alfworld.py [--episodes 50] [--num-tasks 600] [--seed 0] [--split train]
                                      [--data PATH] [--planner 0]

Runs in a fresh temporary RAYSAD_CACHE, so every game is written and compiled cold.
"--planner N" also asks fast-downward for an optimal plan on N generated games (slower; it proves solvability
independently of the scripted expert).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50, help="expert episodes (default 50)")
    parser.add_argument("--num-tasks", type=int, default=600, help="generated pool size (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=("train", "valid", "test"))
    parser.add_argument("--data", default=None, help="a real ALFWorld data root instead of generated games")
    parser.add_argument("--planner", type=int, default=0, help="games to check with fast-downward's planner")
    args = parser.parse_args()
    os.environ["RAYSAD_CACHE"] = tempfile.mkdtemp(prefix="raysad-bench-")

    from raysad_envs.alfworld import ALFWorldEnv, list_tasks
    from raysad_envs.alfworld.engine import Engine
    from raysad_envs.alfworld.generator import generate_task, write_trial
    from raysad_envs.alfworld.tasks import generated_index
    from raysad_envs.core import cache_dir

    if args.data is None:
        t0 = time.perf_counter()
        tasks = [generate_task(args.seed, i) for i in range(args.num_tasks)]
        gen_s = time.perf_counter() - t0
        print(f"generate {args.num_tasks} problems: {gen_s:.2f} s ({1000 * gen_s / args.num_tasks:.1f} ms each); "
              f"types {dict(Counter(t.task_type for t in tasks))}; rooms {dict(Counter(t.room for t in tasks))}")

    ids = list_tasks(args.split, data=args.data, seed=args.seed, num_tasks=args.num_tasks)[: args.episodes]
    env = ALFWorldEnv(split=args.split, data=args.data, seed=args.seed, num_tasks=args.num_tasks)
    reset_s, step_s, steps, success, by_type = [], [], [], 0, Counter()
    t_all = time.perf_counter()
    for task_id in ids:
        t0 = time.perf_counter()
        env.reset(seed=0, options={"task_id": task_id})  # cold: write the game file + load + translate
        reset_s.append(time.perf_counter() - t0)
        done, info = False, {}
        while not done:
            thought, action = env.expert_turn()
            t0 = time.perf_counter()
            _, _, terminated, truncated, info = env.step(action)
            step_s.append(time.perf_counter() - t0)
            done = terminated or truncated
        success += info["success"]
        steps.append(info["steps"])
        by_type[(info["task_type"], info["success"])] += 1
    total = time.perf_counter() - t_all
    t0 = time.perf_counter()
    env.reset(seed=0, options={"task_id": ids[-1]})
    warm_reset = time.perf_counter() - t0
    env.close()

    n = len(ids)
    print(f"expert on {n} {args.split} tasks ({'real' if args.data else 'generated'}): success {success}/{n} "
          f"= {success / n:.1%}; steps per episode mean {statistics.mean(steps):.1f}, median "
          f"{statistics.median(steps)}, max {max(steps)}")
    print("  by type (type, success): " + ", ".join(f"{k}: {v}" for k, v in sorted(by_type.items())))
    print(f"reset, cold (write + compile a new game): mean {statistics.mean(reset_s):.2f} s, max {max(reset_s):.2f} s; "
          f"reset of the loaded game: {warm_reset:.2f} s")
    print(f"step: mean {1000 * statistics.mean(step_s):.0f} ms, p90 "
          f"{1000 * sorted(step_s)[int(0.9 * len(step_s))]:.0f} ms; whole run {total:.1f} s")

    if args.planner and args.data is None:
        engine, found, plan_s, lengths = Engine(), 0, [], []
        root = cache_dir("alfworld") / f"generated-v1-seed{args.seed}"
        for task_id in ids[: args.planner]:
            game = write_trial(generate_task(args.seed, generated_index(task_id)), root)
            engine.start(str(game))
            t0 = time.perf_counter()
            plan = engine.plan()
            plan_s.append(time.perf_counter() - t0)
            for command in plan:
                engine.step(command)
            found += engine.won
            lengths.append(len(plan))
        engine.close()
        print(f"planner: {found}/{len(plan_s)} generated games solved by fast-downward's optimal plan; plan length "
              f"mean {statistics.mean(lengths):.1f}; planning time mean {statistics.mean(plan_s):.2f} s, "
              f"max {max(plan_s):.2f} s")


if __name__ == "__main__":
    main()
