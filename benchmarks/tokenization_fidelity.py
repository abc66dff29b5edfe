"""Token-in, token-out, measured: a teacher plays episodes on Ray (the real rollout path) and, per env, this
prints the share of turns whose rollout context ids differ from the training ids (must be 0), the largest
|stored top-k log-prob - the teacher's log-prob on the training sequence| over all stored entries (<= 1e-4 in
fp32), and the shares of truncated and empty turns.

    python benchmarks/tokenization_fidelity.py --model models/smollm2-135m-instruct --episodes 50
    .venv-vllm/bin/python benchmarks/tokenization_fidelity.py --engine vllm --model ... --episodes 50

Every prompt the engine is given is recorded (raysad.fidelity.RecordingEngine) and compared with what
encoding.encode_trajectory makes of the written trajectories.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="teacher HF folder (e.g. a converted SmolLM2)")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--envs", default="hotpotqa,webshop,alfworld")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--max-turns", type=int, default=4, help="env steps per episode (turns)")
    parser.add_argument("--few-shot", type=int, default=1)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--data", default=None, help="real data path (one env)")
    parser.add_argument("--out", default=None, help="where trajectories go (default: a temporary folder)")
    args = parser.parse_args()

    from raysad import fidelity, models
    from raysad.rollout import RolloutConfig, run_rollout
    from raysad.serving import default_engine_factory
    from raysad.trajectory_reader import read_trajectories

    out = Path(args.out or tempfile.mkdtemp(prefix="fidelity-"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model, dtype="float32", device="cpu")
    engine_args = {"dtype": "float32"} if args.engine == "hf" else {"dtype": "float32", "max_model_len": 4096}
    print(f"teacher {args.model} ({args.engine}, fp32), {args.episodes} episodes per env, <= {args.max_turns} "
          f"steps, few-shot {args.few_shot}, top-{args.topk}")
    rows = []
    for env in args.envs.split(","):
        prompts = out / f"{env}.prompts.jsonl"
        prompts.unlink(missing_ok=True)
        cfg = RolloutConfig(env=env, split="train", data=args.data, episodes=args.episodes, policy=args.engine,
                            model=args.model, topk=args.topk, few_shot=args.few_shot, max_turns=args.max_turns,
                            env_actors=1, envs_per_actor=16, engine_args=engine_args,
                            out=str(out / f"{env}.jsonl"), experiment="tokenization-fidelity")
        (out / f"{env}.jsonl").unlink(missing_ok=True)
        start = time.time()
        run_rollout(cfg, engine_factory=fidelity.recording_factory(default_engine_factory(cfg), prompts),
                    progress=False, track=False)
        with read_trajectories(cfg.out) as reader:
            trajs = list(reader)
        contexts = fidelity.context_mismatches(trajs, tokenizer, fidelity.read_prompts(prompts))
        error = fidelity.topk_error(model, trajs, tokenizer)
        shares = fidelity.turn_shares(trajs)
        rows.append((env, len(trajs), contexts, error, shares, time.time() - start))
        print(f"{env:9s} episodes {len(trajs):3d}  turns {contexts['turns']:4d}  context ids != training ids: "
              f"{contexts['mismatched'] / max(contexts['turns'], 1):.1%}  max |top-k logprob error| "
              f"{error['max_abs_error']:.2e} over {error['entries']} entries  truncated {shares['truncated']:.1%}  "
              f"empty thought {shares['empty_thought']:.1%}  ({time.time() - start:.0f} s)", flush=True)
    bad = [env for env, _, c, e, _, _ in rows if c["mismatched"] or e["max_abs_error"] > 1e-4]
    print("PASS" if not bad else f"FAIL: {', '.join(bad)}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
