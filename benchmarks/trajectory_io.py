"""Trajectory files: write/read speed, size and peak memory of JSONL vs Parquet, and encode speed.

    python benchmarks/trajectory_io.py --n 2000 --turns 8 --tokens 48 --topk 20

Prints one line per format: trajectories/s written and read, file MB, and the peak Python memory while
reading (tracemalloc; it stays flat as --n grows because reading streams), then encode_trajectory's rate
with a byte-level BPE trained on the fly.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from raysad.encoding import encode_trajectory
from raysad.segments import render
from raysad.trajectory import Trajectory, Turn
from raysad.trajectory_reader import read_trajectories
from raysad.trajectory_writer import TrajectoryWriter


def synthetic(n: int, turns: int, tokens: int, k: int, seed: int = 0):
    rng = random.Random(seed)
    for j in range(n):
        ts = []
        for i in range(turns):
            ids = [rng.randrange(256) for _ in range(tokens)]  # byte-level ids: valid in any BPE below
            ts.append(Turn(thought=f"I should look at item {i} of task {j}.", action=f"go to shelf {i}",
                           observation=f"On the shelf {i}, you see a mug {i} and a book {j % 7}.",
                           token_ids=ids, num_thought_tokens=tokens // 2,
                           topk_ids=[[t] + [rng.randrange(32000) for _ in range(k - 1)] for t in ids] if k else None,
                           topk_logprobs=[[-rng.random() * 5 for _ in range(k)] for _ in ids] if k else None))
        yield Trajectory(id=f"traj-{j}", env="alfworld", task_id=f"task-{j}", split="train",
                         instruction="put a mug on the shelf", prompt="You are in the middle of a room.\n" * 20,
                         turns=ts, reward=1.0, success=True, policy={"backend": "vllm", "model": "teacher"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="trajectories")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48, help="generated tokens per turn")
    p.add_argument("--topk", type=int, default=20, help="teacher top-k per token (0: none)")
    args = p.parse_args()
    trajs = list(synthetic(args.n, args.turns, args.tokens, args.topk))
    print(f"{args.n} trajectories x {args.turns} turns x {args.tokens} tokens, top-{args.topk}")
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("jsonl", "parquet"):
            path = Path(tmp) / f"trajs.{suffix}"
            t0 = time.perf_counter()
            with TrajectoryWriter(path) as out:
                for t in trajs:
                    out.write(t)
            t1 = time.perf_counter()
            tracemalloc.start()
            count = sum(1 for _ in read_trajectories(path))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            t2 = time.perf_counter()
            t3 = time.perf_counter()
            count = sum(1 for _ in read_trajectories(path))
            t4 = time.perf_counter()
            assert count == args.n
            print(f"{suffix:8s} write {args.n / (t1 - t0):8.0f}/s  read {args.n / (t4 - t3):8.0f}/s  "
                  f"size {path.stat().st_size / 2**20:7.1f} MB  peak read memory {peak / 2**20:6.1f} MB")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text_only = [Trajectory(**{**t.__dict__, "turns": [Turn(x.thought, x.action, x.observation) for x in t.turns]})
                 for t in trajs[:500]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((render(t).text for t in text_only[:100]),
                            trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    for name, items in (("text only", text_only), ("stored ids", trajs[:500])):
        t0 = time.perf_counter()
        n_tokens = sum(len(encode_trajectory(t, tokenizer, "alfworld")["input_ids"]) for t in items)
        dt = time.perf_counter() - t0
        print(f"encode_trajectory ({name}): {len(items) / dt:7.0f} trajectories/s, {n_tokens / dt:9.0f} tokens/s")


if __name__ == "__main__":
    main()
