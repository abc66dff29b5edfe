"""Figures for the HotPotQA-ReAct environment: generation time, bm25 index build/load time, search latency,
expert success and steps per episode.

    python benchmarks/env_hotpotqa.py [--num-tasks 3000] [--episodes 50] [--seed 0] [--data PATH]

The index is built in a fresh temporary RAYSAD_CACHE, so "build" is a cold build and "load" a disk reload.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tasks", type=int, default=3000, help="generated questions (default 3000)")
    parser.add_argument("--episodes", type=int, default=50, help="expert episodes on the test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="HotpotQA JSON file/dir instead of the generated world")
    args = parser.parse_args()
    os.environ["RAYSAD_CACHE"] = tempfile.mkdtemp(prefix="raysad-bench-")

    from raysad_envs.hotpotqa import HotPotQAEnv
    from raysad_envs.hotpotqa.corpus import Corpus, load_or_build_index
    from raysad_envs.hotpotqa.generate import generate

    if args.data is None:
        start = time.perf_counter()
        pages, tasks = generate(args.seed, args.num_tasks)
        print(f"generate: {len(tasks)} questions, {len(pages)} pages in {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    env = HotPotQAEnv(split="test", data=args.data, seed=args.seed, num_tasks=args.num_tasks if not args.data else None)
    print(f"env construction (load/generate + corpus): {time.perf_counter() - start:.2f} s")
    corpus = env.dataset.corpus
    start = time.perf_counter()
    _ = corpus.index
    print(f"bm25 index build: {len(corpus)} pages in {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    load_or_build_index(Corpus(corpus.pages))
    print(f"bm25 index load from disk cache: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    for page in corpus.pages[:200]:
        corpus.similar(page.title + " page")
    print(f"similar-title search: {(time.perf_counter() - start) / min(200, len(corpus)) * 1000:.2f} ms per query")

    ids = env.task_ids()[: args.episodes]
    successes, steps, f1s = 0, [], []
    start = time.perf_counter()
    for task_id in ids:
        env.reset(options={"task_id": task_id})
        while True:
            _, action = env.expert_turn()
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        successes += info["success"]
        steps.append(info["steps"])
        f1s.append(info.get("f1", 0.0))
    elapsed = time.perf_counter() - start
    histogram = {n: steps.count(n) for n in sorted(set(steps))}
    print(f"expert: success {successes}/{len(ids)} ({successes / max(1, len(ids)):.0%}), mean F1 "
          f"{statistics.fmean(f1s):.3f}, steps/episode mean {statistics.fmean(steps):.2f} {histogram}, "
          f"{elapsed / max(1, len(ids)) * 1000:.1f} ms/episode")
    env.close()


if __name__ == "__main__":
    main()
