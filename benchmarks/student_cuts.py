"""How broken is a student cut from a real teacher before it is trained? Cross-entropy of the teacher's own
thought/action tokens under layer cuts and MLP-width cuts of the teacher, before any distillation step.

    python benchmarks/student_cuts.py --teacher runs/replicate-smollm2/hotpotqa/teacher \
        --trajectories runs/replicate-smollm2/hotpotqa/teacher.jsonl

Prints one table: the cut, its parameters, and the mean CE (nats per reason/act token) over the first
`--episodes` trajectories. The uncut teacher is the first row (a fine-tuned teacher scores its own tokens
near 0); a uniform guess over SmolLM2's 49,152 tokens is ln(49152) = 10.8 nats.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    import torch

    from raysad import models, students
    from raysad.encoding import encode_trajectory
    from raysad.evaluate import examples_ce
    from raysad.policies.hf import HFEngine
    from raysad.trajectory_reader import read_trajectories

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="HF folder of the (fine-tuned) teacher")
    parser.add_argument("--trajectories", required=True, help="its trajectories (JSONL/Parquet)")
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = models.load_tokenizer(args.teacher)
    teacher = models.load_model(args.teacher, device="cpu")
    trajectories = [t for _, t in zip(range(args.episodes), read_trajectories(args.trajectories))]
    examples = [encode_trajectory(t, tokenizer, max_length=args.max_length) for t in trajectories]
    specs = ["derive:keep_every=1", "derive:keep_every=4", "derive:keep_every=2", "derive:first=2,last=6",
             "derive:first=4,last=4", "derive:first=6,last=9", "derive:first=8,last=7", "derive:first=8,last=8",
             "derive:first=10,last=10", "derive:first=12,last=12", "derive:keep_every=1,width_factor=0.75",
             "derive:keep_every=1,width_factor=0.5"]
    print(f"{'student (derive spec)':40s} {'layers':>6s} {'params':>8s} {'CE':>7s}")
    for spec in specs:
        model = students.derive_student(teacher, **students.parse_derive_spec(spec))
        params = sum(p.numel() for p in model.parameters())
        name = spec + (" (the teacher)" if spec == "derive:keep_every=1" else "")
        ce = examples_ce(HFEngine(model, tokenizer, prefix_cache=0), examples)
        print(f"{name:40s} {model.config.num_hidden_layers:6d} {params / 1e6:7.1f}M {ce:7.3f}", flush=True)
    print(f"(uniform over the vocabulary: {math.log(len(tokenizer)):.1f} nats; {len(examples)} trajectories, "
          f"{args.trajectories})")


if __name__ == "__main__":
    main()
