"""On-policy distillation: time per iteration split into play / score + train, strictly alternating
(`max_staleness 0`) against playing the next iteration while this one trains (`max_staleness 1`), on the same
work, side by side.

    python benchmarks/onpolicy_throughput.py                      # tiny models, HotPotQA, ~5 min on 2 cores
    python benchmarks/onpolicy_throughput.py --repeats 5 --iterations 4 --episodes 16

Models are built here, offline: a tokenizer trained on HotPotQA expert episodes, a tiny-5m teacher (its final
norm scaled up: peaked distributions) and a tiny-1m student. Both sides run the same iterations, tasks, seeds
and steps; the sides alternate over `--repeats` (fresh output folders each time), and the table gives medians
and the spread. "iteration" is the wall time from the start of the first iteration to the end of the last
divided by the iterations (Ray start-up excluded); "waited" is the time an iteration waited for its episodes.
The load average is printed before and after: measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_models(root: Path) -> tuple[Path, Path]:
    import torch

    from raysad import models
    from raysad.policies.expert import expert_episodes
    from raysad.sft import trajectory_texts

    texts = list(trajectory_texts(expert_episodes("hotpotqa", 32, max_turns=6)))
    tokenizer = models.train_tokenizer(texts, vocab_size=1024, out_dir=root / "tok")
    paths = []
    for name, size, seed, scale in (("teacher", "tiny-5m", 1, 8.0), ("student", "tiny-1m", 2, 1.0)):
        model = models.build_tiny_model(size, tokenizer, seed=seed)
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)
        model.save_pretrained(root / name)
        models.save_tokenizer(tokenizer, root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def run_side(args, teacher: Path, student: Path, out: Path, staleness: int) -> dict[str, float]:
    from raysad.configs import OnPolicyConfig
    from raysad.onpolicy import run_onpolicy

    cfg = OnPolicyConfig(student=str(student), teacher=str(teacher), out=str(out), env="hotpotqa",
                         iterations=args.iterations, episodes=args.episodes, max_turns=args.max_turns,
                         max_new_tokens=args.max_new_tokens, max_steps=args.max_steps, batch_size=args.batch_size,
                         micro_batch_size=args.batch_size, max_length=768, lr=1e-3, warmup_steps=0, workers=0,
                         env_actors=1, envs_per_actor=args.episodes, max_staleness=staleness, seed=0)
    began = time.perf_counter()
    result = run_onpolicy(cfg, track=False, progress=False)
    wall = time.perf_counter() - began
    its = result.iterations
    return {"wall_s": wall,
            "iteration_s": sum(m["onpolicy/wait_for_play_s"] + m["onpolicy/score_train_s"] for m in its) / len(its),
            "play_s": statistics.mean(m["onpolicy/play_s"] for m in its),
            "waited_s": statistics.mean(m["onpolicy/wait_for_play_s"] for m in its),
            "score_train_s": statistics.mean(m["onpolicy/score_train_s"] for m in its),
            "tokens_trained": sum(m["onpolicy/tokens_trained"] for m in its)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per iteration")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-steps", type=int, default=8, help="optimizer steps per iteration")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="onpolicy-bench-"))
    teacher, student = build_models(root)
    sides = {"alternating (max_staleness 0)": 0, "overlapped (max_staleness 1)": 1}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, staleness in (sides.items() if repeat % 2 == 0 else reversed(list(sides.items()))):
            runs[name].append(run_side(args, teacher, student, root / f"{staleness}-{repeat}", staleness))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {runs[name][-1]['iteration_s']:.1f} s per iteration",
                  flush=True)
    load_after = os.getloadavg()

    def cell(name: str, key: str) -> str:
        values = [r[key] for r in runs[name]]
        return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"

    keys = ("iteration_s", "play_s", "waited_s", "score_train_s", "wall_s")
    print(f"\n{args.iterations} iterations x {args.episodes} episodes (<= {args.max_turns} turns), {args.max_steps} "
          f"steps of batch {args.batch_size}; tiny-1m student, tiny-5m teacher; median [min-max] of "
          f"{args.repeats} alternating repeats; load {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{os.cpu_count()} CPUs")
    print(f"| side | {' | '.join(keys)} | tokens trained |")
    print(f"|---|{'---|' * len(keys)}---|")
    for name in sides:
        print(f"| {name} | {' | '.join(cell(name, k) for k in keys)} | {runs[name][0]['tokens_trained']:.0f} |")
    ratio = (statistics.median(r["iteration_s"] for r in runs["alternating (max_staleness 0)"])
             / statistics.median(r["iteration_s"] for r in runs["overlapped (max_staleness 1)"]))
    print(f"\noverlapped / alternating speed per iteration: x{ratio:.2f} (goal >= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
