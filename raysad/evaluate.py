"""Evaluation stage: a policy (a distilled student, a teacher, the expert, the random baseline) plays a held-out
split on the rollout actor pool, and its episodes become the metrics of docs/metrics.md (`raysad evaluate`).

    cfg = EvalConfig(env="webshop", split="test", policy="hf", model="runs/student_sad", episodes=50,
                     reference="runs/teacher_test.jsonl", out="runs/eval_sad")
    metrics = run_evaluate(cfg)        # {"eval/success_rate": ..., ...}; also <out>/eval.json and MLflow

What it measures, and how:
  episodes      rollout.run_rollout writes <out>/trajectories.jsonl (rerunning the same command resumes it);
                success, reward, score (WebShop's reward; else = success), EM/F1 (HotPotQA), steps and the
                invalid-action rate all come from that file, restricted to the tasks of this run.
  reasoning     mean thought tokens per episode and per turn: the ids the model generated (Turn.num_thought_tokens),
                or the thought re-tokenised with --tokenizer (default: the model's); without any tokenizer
                (expert, random) whitespace words are counted and eval.json says so.
  speed         latency per step: the mean time one agent waits for a turn, i.e. two engine calls (thought,
                action) of the pool's batched engine; tokens/s: generated tokens over the run's wall time.
                Both describe the episodes played in this call (a resumed run with nothing left has none).
  CoT match     with --reference (teacher trajectories of the same env): for every prefix of every reference
                trajectory the policy writes the next turn from the same context (segments.render_context;
                next_turns, batched), or, for the expert/random policies, from the env replayed to that prefix.
                cot_match_rate: share of prefixes where the actions agree (lower-cased, spaces collapsed);
                thought_match_rate / thought_f1: the same for thoughts (exact / token F1).
  reference CE  with --reference and a text model (hf, vllm, openai): the model's mean cross-entropy (nats per token) on the
                reference's thought and action tokens, teacher-forced on the very ids the reference generated
                (encoding.encode_trajectory; engine.token_logprobs of the evaluated model's engine, the one the
                CoT match uses, on its GPU where it has one): how close a student's distribution is to its
                teacher's choices, even before it solves anything. No generation; --no-cot-match keeps only this.
  params        the model's parameter count, read from its safetensors headers (no weights loaded).
  student       method, student_size, lambdas, prune ratio, seed: flags, else <model>/raysad.json, else
                <model>/prune_summary.json (prune_ratio); logged as MLflow params for `raysad report`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

from raysad import report as names
from raysad.config import values_of
from raysad.configs import EvalConfig, Play, Policy, RayCluster, RolloutConfig, Tasks, Tracking
from raysad.policies.base import ENV_SIDE_POLICIES

log = logging.getLogger(__name__)

COT_BATCH = 32                            # reference prefixes per next_turns call
SAMPLES_LOGGED = 5


# --- playing the split ---------------------------------------------------------------------------------------

def rollout_config(cfg: EvalConfig) -> RolloutConfig:
    """The RolloutConfig that plays this evaluation (its output: <out>/trajectories.jsonl)."""
    shared = values_of(cfg, Tasks, Policy, Play, Tracking, RayCluster)
    shared.update(run_name=None, model=None if cfg.policy in ENV_SIDE_POLICIES else cfg.model)
    return RolloutConfig(**shared, out=str(Path(cfg.out) / "trajectories.jsonl"))


def _check_output(path: Path, cfg: EvalConfig, rcfg) -> None:
    """A rerun resumes <out>/trajectories.jsonl; refuse to mix in episodes of another policy or split."""
    from raysad.trajectory_reader import read_trajectories

    if not path.exists() or path.stat().st_size == 0:
        return
    with read_trajectories(path) as reader:
        first = next(iter(reader), None)
    if first is None:
        return
    want = {"backend": rcfg.policy, "model": rcfg.model or rcfg.policy}
    if first.policy != want or first.env != cfg.env or first.split != cfg.split:
        raise ValueError(f"{path}: holds episodes of policy {first.policy} on {first.env}/{first.split}, not of "
                         f"{want} on {cfg.env}/{cfg.split}; choose another --out or delete that directory")


def play(cfg: EvalConfig, progress: bool = True):
    """Play the split (resuming <out>/trajectories.jsonl); returns (this run's trajectories, RolloutSummary)."""
    from raysad.rollout import run_rollout, select_tasks
    from raysad.trajectory_reader import read_trajectories

    rcfg = rollout_config(cfg)
    out = Path(rcfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_output(out, cfg, rcfg)
    summary = run_rollout(rcfg, progress=progress, track=False)
    wanted = set(select_tasks(rcfg))
    trajectories = {}
    with read_trajectories(out) as reader:
        for traj in reader:
            if traj.task_id in wanted:
                trajectories.setdefault(traj.task_id, traj)
    return list(trajectories.values()), summary


# --- replaying an episode in its environment -------------------------------------------------------------------

def reset_seed(seed: int, task_id: str) -> int:
    """The reset seed rollout's env actors use for a task (so a replay sees the same episode)."""
    from raysad_envs.core import stable_hash

    return int(stable_hash(seed, task_id), 16) % 2**31


def invalid_action_rate(trajectories: list) -> float | None:
    """Share of steps the env rejected, from the per-turn flags rollout records (Turn.extra["invalid_action"]);
    turns of trajectories written without them (older files, other tools) are left out."""
    flags = [bool(t.extra["invalid_action"]) for traj in trajectories for t in traj.turns
             if "invalid_action" in t.extra]
    return sum(flags) / len(flags) if flags else None


# --- metrics of the episodes -------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def thought_tokens(turn, fmt, tokenizer) -> int:
    """Thought tokens of a turn: as generated (thought + its end delimiter), else re-tokenised, else words."""
    if turn.num_thought_tokens is not None:
        return int(turn.num_thought_tokens)
    if not turn.thought:
        return 0
    if tokenizer is None:
        return len(turn.thought.split())
    return len(tokenizer.encode(turn.thought + fmt.reason_end, add_special_tokens=False))


def episode_outcomes(trajectories: list) -> list[dict[str, Any]]:
    """Per task (sorted by id): success and score, what a paired comparison of two students reads
    (raysad.stats.paired_difference)."""
    return [{"task_id": t.task_id, "success": bool(t.success),
             "score": float((t.extra.get("metrics") or {}).get("score", t.success))}
            for t in sorted(trajectories, key=lambda t: str(t.task_id))]


def episode_metrics(trajectories: list, fmt, tokenizer=None) -> dict[str, float | None]:
    """Success, reward, score, EM/F1, steps and reasoning length over finished episodes."""
    n = len(trajectories)
    if n == 0:
        return {}
    env_metrics = [t.extra.get("metrics") or {} for t in trajectories]
    m: dict[str, float | None] = {
        names.M_SUCCESS: sum(bool(t.success) for t in trajectories) / n,
        names.M_MEAN_REWARD: sum(float(t.reward) for t in trajectories) / n,
        # WebShop reports a score; for the others (ALFWorld, HotPotQA) the score is success
        names.M_SCORE: _mean(float(em.get("score", t.success)) for t, em in zip(trajectories, env_metrics)),
        names.M_STEPS: sum(len(t.turns) for t in trajectories) / n,
    }
    if any("em" in em or "f1" in em for em in env_metrics):  # a QA env: an episode without an answer scores 0
        m[names.M_EM] = _mean(float(em.get("em", 0.0)) for em in env_metrics)
        m[names.M_F1] = _mean(float(em.get("f1", 0.0)) for em in env_metrics)
    per_episode = [[thought_tokens(turn, fmt, tokenizer) for turn in t.turns] for t in trajectories]
    m[names.M_REASONING_TOKENS] = _mean(sum(e) for e in per_episode)
    m["eval/reasoning_tokens_per_turn"] = _mean(x for e in per_episode for x in e)
    m["eval/episodes"] = n
    m["eval/errors"] = sum("error" in t.extra for t in trajectories)
    return m


def speed_metrics(summary) -> dict[str, float | None]:
    """Latency per agent step and generation throughput of the episodes played in this call, and the engines'
    own counters (hf: decode rows, prefix-cache reuse) as the rollout's metrics have them."""
    if summary.episodes == 0 or summary.steps == 0:
        return {names.M_LATENCY: None, names.M_TOKENS_PER_S: None}
    rollout = summary.metrics()
    engine = {f"eval/engine_{k}": rollout[f"rollout/engine_{k}"] for k in ("decoded_rows", "prefix_reuse_frac")
              if f"rollout/engine_{k}" in rollout}
    if summary.engine_calls:  # a turn is two engine calls; batched agents wait for the whole call
        latency = 2 * summary.engine_busy_s / summary.engine_calls
    else:  # env-side policies: the pool's wall time per step
        latency = summary.wall_s / summary.steps
    tokens_per_s = summary.tokens_generated / summary.wall_s if summary.tokens_generated and summary.wall_s else None
    return {names.M_LATENCY: latency, names.M_TOKENS_PER_S: tokens_per_s, **engine}


# --- CoT match on reference prefixes -----------------------------------------------------------------------------

def normalize_action(action: str) -> str:
    """Lower-case, whitespace collapsed: "Search[ Foo  Bar]" and "search[ foo bar]" are one action."""
    return " ".join(action.lower().split())


def token_f1(prediction: str, reference: str) -> float:
    """Token F1 of two texts (lower-cased whitespace tokens); two empty texts match (1.0)."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def compare_turns(pairs: list[tuple[Any, Any]]) -> dict[str, float | None]:
    """(policy turn, reference turn) pairs -> action match rate, thought exact match rate, thought token F1."""
    if not pairs:
        return {names.M_COT_MATCH: None, "eval/thought_match_rate": None, "eval/thought_f1": None,
                "eval/cot_prefixes": 0}
    n = len(pairs)
    return {
        names.M_COT_MATCH: sum(normalize_action(a.action) == normalize_action(b.action) for a, b in pairs) / n,
        "eval/thought_match_rate": sum(normalize_action(a.thought) == normalize_action(b.thought)
                                       for a, b in pairs) / n,
        "eval/thought_f1": sum(token_f1(a.thought, b.thought) for a, b in pairs) / n,
        "eval/cot_prefixes": n,
    }


def read_reference(path: str | Path, env: str, limit: int | None = None) -> list:
    """The reference trajectories of `env` in `path` (the first `limit` of them)."""
    import raysad_envs
    from raysad.trajectory_reader import read_trajectories

    want = raysad_envs.canonical(env)
    kept, other = [], Counter()
    with read_trajectories(path) as reader:
        for traj in reader:
            try:
                same = raysad_envs.canonical(traj.env) == want
            except ValueError:  # an env this installation does not know
                same = False
            if same:
                kept.append(traj)
            else:
                other[traj.env] += 1
            if limit is not None and len(kept) >= limit:
                break
    if other:
        log.warning("%s: skipped %d reference trajectories of other envs (%s)", path, sum(other.values()),
                    ", ".join(map(str, other)))
    if not kept:
        raise ValueError(f"{path}: no reference trajectories of env {env!r}")
    return kept


def text_policy_turns(engine, reference: list, fmt, cfg: EvalConfig, progress: bool = True) -> list[tuple]:
    """The policy's turn at every prefix of every reference trajectory (batched next_turns), paired with the
    reference's turn there."""
    from raysad.policies.base import next_turns

    tokenizer = _load_tokenizer(cfg)
    budget = env_token_budget(cfg)
    jobs = [(traj, n) for traj in reference for n in range(len(traj.turns))]
    pairs = []
    with _bar("CoT match", len(jobs), progress) as advance:
        for start in range(0, len(jobs), COT_BATCH):
            chunk = jobs[start:start + COT_BATCH]
            turns = next_turns(engine, tokenizer, fmt, [traj.prompt for traj, _ in chunk],
                               [traj.turns[:n] for traj, n in chunk], max_thought_tokens=budget[0],
                               max_action_tokens=budget[1], temperature=cfg.temperature, seed=cfg.seed)
            pairs += [(turn, traj.turns[n]) for turn, (traj, n) in zip(turns, chunk)]
            advance(len(chunk))
    return pairs


def env_policy_turns(policy, make_env, reference: list, seed: int, progress: bool = True) -> list[tuple]:
    """The expert's / random policy's turn at every prefix of every reference trajectory, from the env replayed
    along the reference's actions (a replay that departs from the recorded observations stops there)."""
    env = make_env()
    pairs, diverged = [], 0
    with _bar("CoT match", sum(len(t.turns) for t in reference), progress) as advance:
        for traj in reference:
            env.reset(seed=reset_seed(seed, traj.task_id), options={"task_id": traj.task_id})
            for n, ref_turn in enumerate(traj.turns):
                pairs.append((policy.next_turns([env])[0], ref_turn))
                advance(1)
                obs, _, terminated, truncated, _ = env.step(ref_turn.action)
                last = n + 1 == len(traj.turns)
                if not last and (obs != ref_turn.observation or terminated or truncated):
                    diverged += 1
                    advance(len(traj.turns) - n - 1)
                    break
    if diverged:
        log.warning("CoT match: %d reference trajectories did not replay to their end in the env (other data or "
                    "seed?); their later prefixes are left out", diverged)
    return pairs


def reference_metrics(cfg: EvalConfig, rcfg, fmt, reference: list, progress: bool = True) -> dict[str, float | None]:
    """Against the reference trajectories: CoT/action/thought match of the policy (cfg.cot_match; see the module
    docstring) and its reference CE (an openai server must echo the log-probs of given token ids, as vLLM's and
    serve_hf's do); both from one engine of the evaluated model."""
    if cfg.policy in ENV_SIDE_POLICIES:
        if not cfg.cot_match:
            return {}
        from raysad.env_actors import default_env_factory
        from raysad.policies.base import make_policy

        policy = make_policy(cfg.policy, seed=cfg.seed)
        return compare_turns(env_policy_turns(policy, default_env_factory(rcfg), reference, cfg.seed, progress))
    with reference_engine(rcfg) as engine:
        metrics = compare_turns(text_policy_turns(engine, reference, fmt, cfg, progress)) if cfg.cot_match else {}
        tokenizer = _load_tokenizer(cfg) or engine.tokenizer  # (an openai engine's: its --tokenizer)
        metrics[names.M_REFERENCE_CE] = engine_reference_ce(engine, reference, tokenizer)
    return metrics


@contextlib.contextmanager
def reference_engine(rcfg):
    """An engine of the evaluated model: built in this process where it would run on CPU anyway (no actor to
    start), else an engine actor on the GPU placement(rcfg) gives it."""
    import ray

    from raysad.serving import RemoteEngine, default_engine_factory, placement, start_engines

    make_engine = default_engine_factory(rcfg)
    gpus, cpus, _ = placement(dataclasses.replace(rcfg, engines=1))
    if gpus == 0:
        yield make_engine()
        return
    (handle,) = start_engines(make_engine, 1, gpus, cpus)
    try:
        ray.get(handle.ready.remote())
        yield RemoteEngine(handle)
    finally:
        ray.kill(handle)


# reference trajectories per teacher-forced request: one, as before the engines scored them (an hf engine's
# forward holds a [T, vocabulary] block of logits per trajectory: gigabytes for a long one and a large vocabulary)
CE_BATCH = 1


def engine_reference_ce(engine, reference: list, tokenizer) -> float | None:
    """Mean cross-entropy (nats per token) of the engine's model on the reference trajectories' thought + action
    tokens, teacher-forced on the very ids the reference generated (encoding.encode_trajectory, as training reads
    them); None when they hold no such token. The reference must come from a model with the same tokenizer: its
    ids are read by this one."""
    from raysad.encoding import encode_trajectory

    _check_reference_tokenizer(reference, tokenizer)
    return examples_ce(engine, [encode_trajectory(traj, tokenizer) for traj in reference])


def examples_ce(engine, examples: list[dict]) -> float | None:
    """Mean cross-entropy (nats per token) of the engine's model on encoded examples' thought + action tokens
    (reason_mask | act_mask of encoding.encode_trajectory; engine.token_logprobs); None when they hold no such
    token. An in-memory model: examples_ce(HFEngine(model, tokenizer, prefix_cache=0), examples)."""
    requests = []  # (ids before the first scored token, ids up to the last, offsets of the scored ones)
    for ex in examples:
        ids = ex["input_ids"].tolist()
        scored = [i for i in (ex["reason_mask"] | ex["act_mask"]).nonzero()[0].tolist() if i > 0]
        if scored:
            first = scored[0]
            requests.append((ids[:first], ids[first:scored[-1] + 1], [i - first for i in scored]))
    total, count = 0.0, 0
    for start in range(0, len(requests), CE_BATCH):
        chunk = requests[start:start + CE_BATCH]
        for (_, _, offsets), logprobs in zip(chunk, engine.token_logprobs([r[0] for r in chunk],
                                                                           [r[1] for r in chunk])):
            total -= sum(logprobs[k] for k in offsets)
            count += len(offsets)
    return total / count if count else None


def reference_ce(model_dir: str | Path, reference: list, tokenizer_dir: str | Path | None = None,
                 **engine_args: Any) -> float | None:
    """engine_reference_ce of the HF model in `model_dir`, on an hf engine built here (`engine_args`: its
    keywords, e.g. dtype)."""
    from raysad.policies.hf import HFEngine

    engine = HFEngine(model_dir, tokenizer_dir, prefix_cache=0, **engine_args)
    return engine_reference_ce(engine, reference, engine.tokenizer)


def _check_reference_tokenizer(reference: list, tokenizer) -> None:
    """Refuse a reference generated by a model of another vocabulary (its ids would be scored as nonsense)."""
    from raysad.models import check_same_tokenizer, load_tokenizer

    sources = {str(t.policy.get("model")) for t in reference
               if isinstance(t.policy, dict) and t.policy.get("backend") in ("hf", "vllm")}
    for source in sorted(sources):
        if (Path(source) / "config.json").is_file():
            check_same_tokenizer(load_tokenizer(source), tokenizer)
        else:
            log.warning("reference CE: the reference's model %s is not here; its token ids are assumed to be "
                        "this tokenizer's", source)


# --- the model: size and what it is ------------------------------------------------------------------------------

def count_parameters(model_dir: str | Path) -> int | None:
    """Parameters stored in a model directory, from its safetensors headers (tied weights are stored once);
    else from its config on the meta device; None if it is not a model directory."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        total = 0
        for path in files:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for key, entry in header.items():
                if key != "__metadata__":
                    count = 1
                    for dim in entry["shape"]:
                        count *= dim
                    total += count
        return total
    if not (model_dir / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raysad.models import parameter_count

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return parameter_count(model)


def student_params(cfg: EvalConfig) -> dict[str, str]:
    """The report's params describing the evaluated policy: flags, else <model>/raysad.json, else
    <model>/prune_summary.json; the expert and random baselines are their own method."""
    found: dict[str, Any] = {}
    model_dir = Path(cfg.model) if cfg.model and cfg.policy != "openai" else None
    if model_dir is not None and (model_dir / "prune_summary.json").is_file():
        ratio = json.loads((model_dir / "prune_summary.json").read_text()).get("ratio")
        if ratio is not None:
            found[names.P_PRUNE_RATIO] = ratio
    if model_dir is not None and (model_dir / names.STUDENT_LABELS).is_file():
        meta = json.loads((model_dir / names.STUDENT_LABELS).read_text())
        found.update({k: meta[k] for k in names.PARAMS if meta.get(k) is not None})
    if cfg.policy in ENV_SIDE_POLICIES:
        found.setdefault(names.P_METHOD, cfg.policy)
    flags = {names.P_METHOD: cfg.method, names.P_STUDENT_SIZE: cfg.student_size}
    found.update({k: v for k, v in flags.items() if v is not None})
    found.pop(names.P_ENV, None)  # the env is the evaluation's, not the student's
    return {k: str(v) for k, v in found.items()}


def env_token_budget(cfg: EvalConfig) -> tuple[int, int]:
    """The (thought, action) token budgets the evaluation's rollouts use (rollout.token_budget)."""
    from raysad.env_actors import default_env_factory, token_budget

    if cfg.max_new_tokens:
        return token_budget(None, cfg.max_new_tokens, cfg.max_thought_tokens)
    env = default_env_factory(rollout_config(cfg))()
    try:
        return token_budget(env, None, cfg.max_thought_tokens)
    finally:
        env.close()


def _load_tokenizer(cfg: EvalConfig):
    from raysad.models import load_tokenizer

    path = cfg.tokenizer or (cfg.model if cfg.policy in ("hf", "vllm") else None)
    return load_tokenizer(path) if path else None


# --- the stage ---------------------------------------------------------------------------------------------------

def agent_format(env: str, make_env=None):
    """The agent format of an env: the built-in one of the same name, else the env's own `agent_format`."""
    import raysad_envs
    from raysad.agent_formats import BUILTIN_FORMATS, get_format

    name = raysad_envs.canonical(env)
    if name in BUILTIN_FORMATS:
        return get_format(name)
    return get_format((make_env() if make_env else raysad_envs.make(name)).unwrapped.agent_format)


def run_evaluate(cfg: EvalConfig, progress: bool = True, track: bool = True) -> dict[str, float | None]:
    """Play, measure, write <out>/eval.json, log to MLflow (when `track`); returns the metrics. The MLflow run
    spans the whole evaluation: its duration is the evaluation's, and one that fails ends FAILED."""
    from raysad import tracking
    from raysad.config import flatten

    student = student_params(cfg)
    run = contextlib.nullcontext()
    if track:
        params = {"env": cfg.env, "split": cfg.split, "policy": cfg.policy, "model": cfg.model or cfg.policy,
                  **student,
                  # the evaluation's own settings under eval.*: a bare `seed` is the student's (report groups)
                  **{f"eval.{k}": v for k, v in flatten(cfg).items() if v is not None and v != {}}}
        who = Path(cfg.model).name if cfg.model else cfg.policy
        run = tracking.start_run(cfg.experiment, cfg.run_name or f"evaluate-{who}-{cfg.env}-{cfg.split}", params,
                                 uri=cfg.tracking_uri, tags={"stage": "evaluate", "env": cfg.env,
                                                             "policy": cfg.policy})
    with run:
        metrics, result, trajectories = measure(cfg, student, progress)
        if track:
            tracking.log_metrics(metrics)
            tracking.log_text(json.dumps(result, indent=2) + "\n", "eval.json")
            samples = [json.dumps(t.to_dict()) for t in trajectories[:SAMPLES_LOGGED]]
            if samples:
                tracking.log_text("\n".join(samples) + "\n", "samples.jsonl")
    return metrics


def measure(cfg: EvalConfig, student: dict[str, str], progress: bool = True) -> tuple[dict, dict, list]:
    """Play the split and compute the metrics; writes <out>/eval.json. Returns (metrics, eval.json's content,
    this run's trajectories)."""
    import ray

    from raysad.cluster import init_ray
    from raysad.config import redact
    from raysad.env_actors import default_env_factory

    rcfg = rollout_config(cfg)
    started_ray = init_ray(rcfg.ray_address, rcfg.num_cpus)
    began = time.monotonic()
    try:
        make_env = default_env_factory(rcfg)
        fmt = agent_format(cfg.env, make_env)
        trajectories, summary = play(cfg, progress)
        needs_tokenizer = any(t.num_thought_tokens is None and t.thought for tr in trajectories for t in tr.turns)
        tokenizer = _load_tokenizer(cfg) if needs_tokenizer else None
        metrics = episode_metrics(trajectories, fmt, tokenizer)
        metrics[names.M_INVALID_ACTIONS] = invalid_action_rate(trajectories)
        metrics |= speed_metrics(summary)
        metrics[names.M_PARAMS] = count_parameters(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None
        if cfg.reference:
            metrics |= reference_metrics(cfg, rcfg, fmt, read_reference(cfg.reference, cfg.env, cfg.episodes),
                                         progress)
    finally:
        if started_ray:
            ray.shutdown()
    metrics["eval/seconds"] = time.monotonic() - began
    result = {"metrics": metrics, "student": student, "config": dataclasses.asdict(cfg),
              "played_now": summary.episodes, "resumed": summary.skipped,
              "reasoning_token_unit": "tokens" if tokenizer is not None or not needs_tokenizer else "words",
              "trajectories": rcfg.out, "episodes": episode_outcomes(trajectories)}
    result = redact(result)  # what is written (eval.json here and on MLflow) carries no api_key/token/...
    (Path(cfg.out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return metrics, result, trajectories


@contextlib.contextmanager
def _bar(label: str, total: int, enabled: bool):
    """A rich progress bar; yields advance(n)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not enabled) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


_ROWS = [  # (metric, label, format)
    (names.M_SUCCESS, "success rate", "{:.1%}"), (names.M_MEAN_REWARD, "mean reward", "{:.3f}"),
    (names.M_SCORE, "score", "{:.3f}"), (names.M_EM, "EM", "{:.3f}"), (names.M_F1, "F1", "{:.3f}"),
    (names.M_STEPS, "steps per episode", "{:.2f}"), (names.M_INVALID_ACTIONS, "invalid actions", "{:.1%}"),
    (names.M_REASONING_TOKENS, "thought tokens per episode", "{:.1f}"),
    ("eval/reasoning_tokens_per_turn", "thought tokens per turn", "{:.1f}"),
    (names.M_COT_MATCH, "CoT match (actions)", "{:.1%}"), ("eval/thought_match_rate", "thought match", "{:.1%}"),
    ("eval/thought_f1", "thought token F1", "{:.3f}"), ("eval/cot_prefixes", "reference prefixes", "{:.0f}"),
    (names.M_REFERENCE_CE, "reference CE (nats/token)", "{:.3f}"),
    (names.M_LATENCY, "latency per step (s)", "{:.3f}"), (names.M_TOKENS_PER_S, "tokens/s", "{:.1f}"),
    (names.M_PARAMS, "parameters", "{:,.0f}"), ("eval/episodes", "episodes", "{:.0f}"),
    ("eval/errors", "episodes with errors", "{:.0f}"), ("eval/seconds", "evaluation time (s)", "{:.1f}"),
]


def print_metrics(metrics: dict[str, float | None], cfg: EvalConfig) -> None:
    from raysad import ui
    from rich.table import Table

    table = Table(title=f"evaluate: {cfg.env} ({cfg.split}), policy {cfg.policy}"
                        f"{' ' + cfg.model if cfg.model else ''}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, form in _ROWS:
        if key in metrics:
            value = metrics[key]
            table.add_row(label, "-" if value is None else form.format(value))
    table.add_row("written to", str(Path(cfg.out) / "eval.json"))
    ui.console().print(table)


def main(config_path: str | None = None, **flags: Any) -> dict[str, float | None]:
    """`raysad evaluate`: the config from YAML + flags (flags win), the run, the table."""
    from raysad.config import build_config

    cfg = build_config(EvalConfig, config_path, **flags)
    metrics = run_evaluate(cfg)
    print_metrics(metrics, cfg)
    return metrics
