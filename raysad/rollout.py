"""Rollout stage: a teacher (or the scripted expert) plays many environment episodes on Ray (`raysad rollout`).

Who runs where:
  driver        lists the tasks, hands them out, writes finished episodes as they arrive, tracks what is done
  env actors    `env_actors` of them, each stepping `envs_per_actor` environments; at each step all its
                episodes waiting for a turn go to the engine in one batched request (policies.next_turns);
                the expert policy runs here too, without an engine
  engine actors `engines` of them (GPU actors for vLLM); requests arriving together from several env actors
                are merged into one `generate` call, so an engine works on as large a batch as there is; an
                env actor asks an engine on its own node where there is one (serving.pair_with_engines)
  `engine_resources` / `env_actor_resources` (custom resources, e.g. {"teacher_engine": 1}) pin engines / env
  actors to the node type that holds them (cluster.yaml); each trajectory records its env actor's node in
  `extra["node_id"]`

Faults: an env actor that dies is restarted by Ray (`max_restarts`); the driver re-queues the episodes it had
not returned (an episode whose actor failed `max_attempts` times is left for a rerun). An env that raises on a
step, or an engine that fails on one context, ends that episode with `extra["error"]`. Episodes reach the output
once: the driver writes them and remembers their task ids, and a rerun on the same output skips every task
already there without an error (and every task played but deliberately not written, see `done_path`).

Resume: the output itself is the record of what is done (a Parquet output keeps complete, fsynced part files
next to it while it runs, see raysad.trajectory), so a run killed at any point (SIGKILL included) loses only
episodes that were never written, and the rerun plays exactly those. Episodes written with `extra["error"]`
are not done: a rerun drops them from the output (an atomic rewrite) and plays them again, so the output
holds one record per task. The settings that shape the trajectories are kept in `<out>.settings.json`; a
rerun with other settings is refused (pass a fresh --out).

Ray: `ray_address` / $RAY_ADDRESS joins a cluster, else a local Ray starts (Ray >= 2.59 turns token
authentication on for it and generates the token itself, ~/.ray/auth_token; nothing to set).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray

from raysad.cluster import init_ray
from raysad.configs import RolloutConfig
from raysad.env_actors import EnvWorker, default_env_factory, env_kwargs, error_line
from raysad.policies.base import ENV_SIDE_POLICIES
from raysad.serving import default_engine_factory, envs_per_engine, pair_with_engines, placement, start_engines

log = logging.getLogger(__name__)

SAMPLES_LOGGED = 5  # trajectories attached to the MLflow run as samples.jsonl
ACTOR_RESTART_TIMEOUT_S = 300.0  # an env actor that does not answer this long after failing is given up


@dataclass
class RolloutSummary:
    out: str
    episodes: int = 0            # played in this run
    written: int = 0
    skipped: int = 0             # already done in the output (resume)
    successes: int = 0
    errors: int = 0
    steps: int = 0
    tokens_generated: int = 0
    turns_truncated: int = 0     # turns with a segment the engine closed (token budget or EOS before the delimiter)
    thoughts_truncated: int = 0
    actions_truncated: int = 0
    empty_thoughts: int = 0      # model turns whose thought came back empty
    turns_reencoded: int = 0     # turns whose ids a text-only server made us re-derive
    model_turns: int = 0         # turns written by a text engine (the denominators of the three above)
    guide_turns: int = 0         # of those, turns the guide played (cfg.guide_turns / guide_share)
    total_reward: float = 0.0
    actor_failures: int = 0
    engine_waits: int = 0        # env actor calls that waited for a dead engine actor to restart (none failed)
    given_up: list[str] = dataclasses.field(default_factory=list)  # tasks whose actor failed max_attempts times
    engine_calls: int = 0        # generate calls the engines ran (after merging requests)
    engine_prompts: int = 0
    engine_busy_s: float = 0.0   # summed over engines
    engine_nodes: list[str] = dataclasses.field(default_factory=list)  # Ray node id of each engine
    engine_counters: dict[str, float] = dataclasses.field(default_factory=dict)  # the engines' own (hf: decode rows)
    actors_with_local_engine: int = 0  # env actors asking an engine on their own node
    wall_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        n = max(self.episodes, 1)
        wall = max(self.wall_s, 1e-9)
        return {"rollout/success_rate": self.successes / n, "rollout/mean_reward": self.total_reward / n,
                "rollout/mean_steps": self.steps / n, "rollout/tokens_generated": self.tokens_generated,
                "rollout/episodes_per_s": self.episodes / wall, "rollout/steps_per_s": self.steps / wall,
                "rollout/episodes": self.episodes, "rollout/skipped": self.skipped, "rollout/errors": self.errors,
                "rollout/actor_failures": self.actor_failures, "rollout/engine_waits": self.engine_waits,
                "rollout/turns_truncated": self.turns_truncated, "rollout/thoughts_truncated": self.thoughts_truncated,
                "rollout/actions_truncated": self.actions_truncated, "rollout/empty_thoughts": self.empty_thoughts,
                "rollout/turns_reencoded": self.turns_reencoded, "rollout/guide_turns": self.guide_turns,
                "rollout/truncated_turn_frac": self.turns_truncated / max(self.model_turns, 1),
                "rollout/engine_mean_batch": self.engine_prompts / max(self.engine_calls, 1),
                "rollout/engine_busy_frac": self.engine_busy_s / wall,
                **{f"rollout/engine_{k}": v for k, v in self.engine_counters.items()},
                **({"rollout/engine_prefix_reuse_frac": self.engine_counters["prefix_reused_tokens"]
                    / self.engine_counters["prompt_tokens"]} if self.engine_counters.get("prompt_tokens") else {})}


# --- driver ------------------------------------------------------------------------------------------------

def done_path(out: str | Path) -> Path:
    """Task ids of the episodes played but deliberately not written (with --only-success, failures), so that a
    rerun does not play them again; delete it to retry those. Written episodes are not listed: the output
    itself says which are done (its rows are durable before they count), and errored ones are never done."""
    out = Path(out)
    return out.with_name(out.name + ".done")


def settings_path(out: str | Path) -> Path:
    """The settings an output was written with (RESUME_SETTINGS), JSON; a rerun must match them."""
    out = Path(out)
    return out.with_name(out.name + ".settings.json")


def mlflow_run_path(out: str | Path) -> Path:
    """The id of the MLflow run writing an output (an interrupted run's rerun continues it)."""
    out = Path(out)
    return out.with_name(out.name + ".mlflow_run_id")


RENAMED_SETTINGS = {"max_steps": "max_turns"}  # names older records use

# Config fields that shape the trajectories: an output holds episodes of one setting of these.
RESUME_SETTINGS = ("env", "split", "data", "num_tasks", "max_turns", "policy", "model", "tokenizer", "few_shot",
                   "chat_template", "topk", "max_new_tokens", "max_thought_tokens", "temperature", "seed",
                   "only_success", "context_topk", "guide", "guide_turns", "guide_share", "turn_limit")


def _output_exists(out: Path) -> bool:
    from raysad.trajectory_files import parts_dir

    return out.exists() or parts_dir(out).is_dir() or done_path(out).exists()


def check_settings(cfg: RolloutConfig) -> None:
    """Refuse (ValueError, one line naming the fields) to resume an output written with other settings; record
    the settings of a new output (or of an older one that has none)."""
    from raysad.config import changed_settings, record_settings

    out = Path(cfg.out)
    mine = {k: getattr(cfg, k) for k in RESUME_SETTINGS}
    path = settings_path(out)
    if path.is_file() and _output_exists(out):
        changes = changed_settings(path, mine, only_recorded=True, renamed=RENAMED_SETTINGS)
        if changes:
            raise ValueError(f"{out} was written with other settings ({', '.join(changes)}); rerun with the same "
                             f"settings to resume it, or pass a fresh --out")
    # (re)written: a new output, or an older record completed with the settings it lacked
    record_settings(path, mine)


def select_tasks(cfg: RolloutConfig, make_env: Callable[[], Any] | None = None) -> list[str]:
    """The tasks this run should play (before skipping those already done)."""
    if cfg.task_ids:
        ids = list(cfg.task_ids)
    elif make_env is not None:
        ids = list(make_env().unwrapped.task_ids())
    else:
        import raysad_envs

        kwargs = {k: v for k, v in env_kwargs(cfg).items() if k not in ("split", "max_steps")}
        ids = list(raysad_envs.list_tasks(cfg.env, cfg.split, **kwargs))
    ids = list(dict.fromkeys(map(str, ids)))  # unique, order kept
    if cfg.episodes is not None:
        if cfg.episodes > len(ids):
            log.warning("--episodes %d > %d tasks in split %r: playing all %d", cfg.episodes, len(ids),
                        cfg.split, len(ids))
        ids = ids[: cfg.episodes]
    return ids


def finished_task_ids(out: str | Path) -> set[str]:
    """Task ids already done for this output: those written to it without an error, and those of its done file
    (played, not written). An episode written with extra["error"] is not done (a rerun retries it), even if an
    older done file lists it."""
    return _resume_state(out)[0]


def _resume_state(out: str | Path) -> tuple[set[str], set[str], set[str]]:
    """(done task ids, errored task ids in the output, task ids of the done file)."""
    from raysad.trajectory_reader import read_task_status

    out = Path(out)
    ok, errored = read_task_status(out)
    listed: set[str] = set()
    if done_path(out).exists():
        listed = {line.strip() for line in done_path(out).read_text().splitlines() if line.strip()}
    return set(map(str, ok)) | (listed - set(errored)), set(map(str, errored)), listed


def run_rollout(cfg: RolloutConfig, *, env_factory: Callable[[], Any] | None = None,
                engine_factory: Callable[[], Any] | None = None, engines: list | None = None,
                env_actors: list | None = None, guides: list | None = None, progress: bool = True,
                track: bool = True, _on_write: Callable[[Any], None] | None = None) -> RolloutSummary:
    """Play the tasks of `cfg` and write their trajectories to cfg.out (resuming it). `env_factory` /
    `engine_factory` (picklable, no arguments) replace the registered env / cfg.policy's engine. `engines`:
    engine actors to play with, started and stopped by the caller (on-policy distillation keeps its student's
    across iterations and swaps their weights), instead of cfg.engines new ones. `env_actors`: the same for the
    env actors (start_env_actors; each is told this run's cfg), instead of cfg.env_actors new ones. `guides`: the
    same for the engine actors of cfg.guide, the model that plays the turns cfg.guide_turns / guide_share give it
    (started per run when cfg asks for guide turns and none are given)."""
    from raysad.locks import lock_path, output_lock

    # one writer per output: a second rollout on this --out would play and append the same tasks again
    with output_lock(lock_path(cfg.out), f"rollout --out {cfg.out}"):
        return _run_tracked(cfg, env_factory, engine_factory, (engines, env_actors, guides), progress, track,
                            _on_write)


def _run_tracked(cfg, env_factory, engine_factory, given, progress, track, _on_write) -> RolloutSummary:
    from raysad import tracking
    from raysad.config import flatten

    if not track:
        summary = _run(cfg, env_factory, engine_factory, given, progress, _on_write)
        warn_turns(summary, cfg)
        return summary
    samples: list[str] = []

    def on_write(traj) -> None:
        if len(samples) < SAMPLES_LOGGED:
            samples.append(json.dumps(traj.to_dict()))
        if _on_write is not None:
            _on_write(traj)

    run_name = cfg.run_name or f"rollout-{cfg.policy}-{cfg.env}-{cfg.split}"
    # an interrupted rollout's rerun continues its MLflow run (its metrics then count this invocation's episodes,
    # `skipped` the earlier ones); a rerun over a finished output is a run of its own
    with tracking.resumable_run(mlflow_run_path(cfg.out), cfg.experiment, tracking.absolute_uri(cfg.tracking_uri),
                                run_name, flatten(cfg), {"stage": "rollout", "env": cfg.env, "policy": cfg.policy},
                                reopen_finished=False):
        summary = _run(cfg, env_factory, engine_factory, given, progress, on_write)
        warn_turns(summary, cfg)
        metrics = summary.metrics()
        if summary.episodes == 0:  # all done already (resume): rates of nothing would read as zeros
            metrics = {k: metrics[k] for k in ("rollout/episodes", "rollout/skipped")}
        tracking.log_metrics(metrics)
        if samples:
            tracking.log_text("\n".join(samples) + "\n", "samples.jsonl")
        return summary


def start_env_actors(cfg: RolloutConfig, count: int, env_factory: Callable[[], Any] | None = None) -> list:
    """`count` env actors of cfg's env, each stepping cfg.envs_per_actor envs (Ray restarts one up to
    cfg.max_restarts times)."""
    _, _, actor_cpus = placement(cfg)
    worker_cls = ray.remote(EnvWorker).options(num_cpus=actor_cpus, resources=cfg.env_actor_resources or None,
                                               max_restarts=cfg.max_restarts)
    make_env = env_factory or default_env_factory(cfg)
    return [worker_cls.remote(make_env, cfg.envs_per_actor, cfg) for _ in range(count)]


def start_rollout_engines(cfg: RolloutConfig, make_engine: Callable[[], Any], env_actors: int, episodes: int,
                          reserve_cpus: bool = True) -> list:
    """cfg.engines engine actors placed as placement(cfg) says, each batching the prompts of its share of
    `env_actors` env actors (serving.envs_per_engine) for a run of `episodes`. reserve_cpus=False: an engine
    without a GPU reserves no CPU (on-policy play shares the cores with training)."""
    gpus, cpus, _ = placement(cfg)
    return start_engines(make_engine, cfg.engines, gpus, cpus if reserve_cpus or gpus else 0.0,
                         resources=cfg.engine_resources, max_restarts=cfg.max_restarts,
                         max_batch=envs_per_engine(env_actors, cfg.engines, cfg.envs_per_actor, episodes),
                         batch_wait_s=cfg.batch_wait_s)


def start_guides(cfg: RolloutConfig, env_actors: int, episodes: int) -> list:
    """Engine actors of cfg.guide (as many as cfg.engines, the same backend), reserving no CPU: they share the
    cores with the player's engines, and each plays only some turns. Its tokenizer must be the player's: the
    env actors encode every context once, with the player's."""
    from raysad import models

    for path in (cfg.guide, cfg.tokenizer or cfg.model):
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"guide {cfg.guide}: {path} is not a model directory (no config.json)")
    models.check_same_tokenizer(models.load_tokenizer(cfg.guide), models.load_tokenizer(cfg.tokenizer or cfg.model))
    guide_cfg = dataclasses.replace(cfg, model=cfg.guide, tokenizer=None)
    return start_rollout_engines(guide_cfg, default_engine_factory(guide_cfg), env_actors, episodes,
                                 reserve_cpus=False)


def _run(cfg, env_factory, engine_factory, given, progress, on_write) -> RolloutSummary:
    from raysad.trajectory import Trajectory
    from raysad.trajectory_writer import TrajectoryWriter

    check_settings(cfg)
    tasks = select_tasks(cfg, env_factory)
    done, errored, listed = _resume_state(cfg.out)
    todo = [t for t in tasks if t not in done]
    summary = RolloutSummary(out=str(cfg.out), skipped=len(tasks) - len(todo))
    if not todo:
        return summary
    redo = errored & set(todo)  # errored episodes played again: their old records go (one record per task)
    if redo & listed:  # an older done file listed them: unlist them first, so that a kill cannot strand them
        tmp = done_path(cfg.out).with_name(done_path(cfg.out).name + ".tmp")
        tmp.write_text("".join(t + "\n" for t in sorted(listed - redo)))
        os.replace(tmp, done_path(cfg.out))

    started_here = init_ray(cfg.ray_address, cfg.num_cpus)
    given_engines, given_actors, given_guides = given
    engines, actors, guides = list(given_engines or []), [], list(given_guides or [])
    try:
        n_actors = min(len(given_actors) if given_actors else cfg.env_actors, -(-len(todo) // cfg.envs_per_actor))
        if cfg.policy not in ENV_SIDE_POLICIES and given_engines is None:
            engines = start_rollout_engines(cfg, engine_factory or default_engine_factory(cfg), n_actors, len(todo))
        if (cfg.guide_turns or cfg.guide_share) and given_guides is None:
            guides = start_guides(cfg, n_actors, len(todo))
        actors = list(given_actors[:n_actors]) if given_actors else start_env_actors(cfg, n_actors, env_factory)
        actor_nodes = _wait_ready(cfg, actors, engines + guides, progress)
        earlier = ray.get([e.stats.remote() for e in engines])  # given engines: count this run's calls only
        engine_of = pair_with_engines(actor_nodes, [s["node_id"] for s in earlier])
        guide_of = pair_with_engines(actor_nodes, [s["node_id"] for s in ray.get([g.stats.remote() for g in guides])])
        summary.actors_with_local_engine = sum(bool(engines) and actor_nodes[i] == earlier[e]["node_id"]
                                               for i, e in enumerate(engine_of))

        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        with TrajectoryWriter(cfg.out, append=True, drop_task_ids=redo) as writer, \
                open(done_path(cfg.out), "a") as done_file, _Progress(len(todo), progress, summary) as bar:

            def record(traj: Trajectory) -> None:
                if traj.task_id in done:  # an actor that was only unreachable (not restarted) finished a task
                    return                # that the driver had re-queued: keep the first copy
                summary.episodes += 1
                summary.steps += len(traj.turns)
                summary.successes += bool(traj.success)
                summary.errors += "error" in traj.extra
                summary.total_reward += traj.reward
                count_turns(summary, traj)
                done.add(traj.task_id)  # within this run: keep the first copy
                if traj.success or not cfg.only_success:
                    # the output is the record: a rerun finds it there once the writer made it durable
                    # (an errored one is found as errored and played again)
                    writer.write(traj)
                    summary.written += 1
                    if on_write is not None:
                        on_write(traj)
                elif "error" not in traj.extra:  # played, deliberately not written: remember it
                    done_file.write(traj.task_id + "\n")
                    done_file.flush()
                    os.fsync(done_file.fileno())
                bar.update()

            _drive(cfg, actors, (engines, engine_of), (guides, guide_of), collections.deque(todo), record, summary,
                   bar)
        summary.wall_s = bar.elapsed
        for stats, before in zip(ray.get([e.stats.remote() for e in engines]), earlier):
            summary.engine_calls += stats["calls"] - before["calls"]
            summary.engine_prompts += stats["prompts"] - before["prompts"]
            summary.engine_busy_s += stats["busy_s"] - before["busy_s"]
            summary.engine_nodes.append(stats["node_id"])
            for key, value in stats.get("counters", {}).items():
                summary.engine_counters[key] = (summary.engine_counters.get(key, 0)
                                                + value - before.get("counters", {}).get(key, 0))
    finally:
        # also on Ctrl-C: free their CPUs/GPUs for whatever runs next (given actors are the caller's)
        for actor in ((actors if given_actors is None else []) + (engines if given_engines is None else [])
                      + (guides if given_guides is None else [])):
            ray.kill(actor)
        for engine in (given_engines or []) + (given_guides or []):
            engine.expect.remote(None)  # the caller's engines as they were: no episodes of this run in flight
        if started_here:
            ray.shutdown()
    return summary


def count_turns(summary: RolloutSummary, traj) -> None:
    """Add a trajectory's model turns to the summary's counts of truncated, empty and re-encoded segments."""
    for turn in traj.turns:
        if turn.token_ids is None:
            continue
        summary.model_turns += 1
        closed = turn.extra.get("truncated") or []
        summary.turns_truncated += bool(closed)
        summary.thoughts_truncated += "thought" in closed
        summary.actions_truncated += "action" in closed
        summary.empty_thoughts += not turn.thought.strip()
        summary.turns_reencoded += bool(turn.extra.get("reencoded"))
        summary.guide_turns += bool(turn.extra.get("guide"))


def warn_turns(summary: RolloutSummary, cfg) -> None:
    """Say loudly what a model's turns lost: truncated segments, empty thoughts, re-encoded ids."""
    n = summary.model_turns
    if not n:
        return
    if summary.turns_truncated:
        log.warning("%d of %d turns (%.0f%%) hit the token budget or EOS before their delimiter and were closed "
                    "(thoughts %d, actions %d); raise --max-new-tokens if the env's budget is too small",
                    summary.turns_truncated, n, 100 * summary.turns_truncated / n, summary.thoughts_truncated,
                    summary.actions_truncated)
    if summary.empty_thoughts:
        log.warning("%d of %d turns have an empty thought (%.0f%%): the model wrote the thought's delimiter "
                    "first; try --few-shot or a stronger teacher", summary.empty_thoughts, n,
                    100 * summary.empty_thoughts / n)
    if summary.turns_reencoded:
        log.warning("%d of %d turns carry re-encoded ids (the server took text, not token ids)",
                    summary.turns_reencoded, n)


def _wait_ready(cfg: RolloutConfig, actors: list, engines: list, progress: bool) -> list[str | None]:
    """Wait until every actor is built (models loaded, envs made) and the env actors hold this run's cfg, so
    that a broken set-up fails here, clearly, and the steps/s measured after it are the pool's. Returns the
    node of each env actor. An actor that is not up after cfg.start_timeout_s (its model still loading, or
    its start or restart waiting for resources no node has free) fails the run with a line that names it;
    every START_REPORT_S until then a warning says what is still pending (also where no terminal shows a
    spinner)."""
    import contextlib

    from raysad import ui

    calls = {f"engine actor {i + 1} of {len(engines)}": (lambda e=e: e.ready.remote()) for i, e in enumerate(engines)}
    calls |= {f"env actor {i + 1} of {len(actors)}": (lambda a=a: a.use.remote(cfg)) for i, a in enumerate(actors)}
    status = (ui.console().status(f"starting {len(actors)} env actors and {len(engines)} engines") if progress
              else contextlib.nullcontext())
    with status:
        try:
            answers = wait_for_actors(calls, cfg.start_timeout_s, cfg.engine_resources | cfg.env_actor_resources)
        except ray.exceptions.RayError as err:
            raise RuntimeError(f"an actor failed to start: {error_line(err)}") from err
    return [answers[f"env actor {i + 1} of {len(actors)}"] for i in range(len(actors))]


START_REPORT_S = 60.0  # how often a start that takes long says what it waits for


def wait_for_actors(calls: dict[str, Callable[[], Any]], timeout_s: float,
                    asked: dict[str, float] | None = None) -> dict[str, Any]:
    """{name: answer} of each call (an actor method that returns once the actor is up), waiting up to
    `timeout_s` in all. A call refused while its actor restarts (a handle a caller kept) is sent again. Past
    the timeout: a RuntimeError naming the actors still pending, the custom resources they ask for and what
    the cluster has free."""
    start = time.monotonic()
    refs = {call(): name for name, call in calls.items()}
    answers: dict[str, Any] = {}
    reported = start
    while refs:
        now = time.monotonic()
        if now - start > timeout_s:
            pending = sorted(refs.values())
            free = {k: round(v, 2) for k, v in sorted(ray.available_resources().items())
                    if k in ("CPU", "GPU") or k in (asked or {})}
            asks = f"; they ask for {asked}" if asked else ""
            raise RuntimeError(f"{', '.join(pending)} not up after {timeout_s:.0f} s (--start-timeout-s): a model "
                               f"still loading, or an actor waiting for resources no node has free{asks}; "
                               f"free now: {free}")
        if now - reported >= START_REPORT_S:
            reported = now
            log.warning("still waiting for %s after %.0f s", ", ".join(sorted(refs.values())), now - start)
        done, _ = ray.wait(list(refs), num_returns=1, timeout=min(1.0, max(0.01, timeout_s - (now - start))))
        for ref in done:
            name = refs.pop(ref)
            try:
                answers[name] = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again (Ray refuses until it is back)
                time.sleep(0.2)
                refs[calls[name]()] = name
    return answers


def _drive(cfg: RolloutConfig, actors: list, players: tuple[list, list[int]], guides: tuple[list, list[int]],
           queue: collections.deque, record, summary: RolloutSummary, bar) -> None:
    """Hand out tasks, collect finished episodes, re-queue the tasks of an actor call that failed.

    After a failure the actor gets no tasks until a probe answers: Ray refuses calls while it restarts the
    actor ("actor is restarting"), and those refusals must not count as deaths or as episode attempts. The
    probe (`use`) also hands a restarted actor this run's cfg.

    players = (engines, engine_of): env actor i asks engines[engine_of[i]] (serving.pair_with_engines: one on its
    own node where it can); guides the same for the guide's engines (none: no guide). Each engine is told how
    many episodes its env actors hold (EngineActor.expect: no batch can get more
    prompts), so that once the queue is empty and episodes end, its batches start without waiting out the
    batching window for prompts that will not come.
    """
    n = len(actors)
    (engines, engine_of), (guide_engines, guide_of) = players, guides
    held: list[set[str]] = [set() for _ in actors]  # sent to the actor, not yet returned finished
    failures, probing, abandoned = [0] * n, [False] * n, [False] * n
    retry_at, backoff, probe_since = [0.0] * n, [0.25] * n, [0.0] * n
    in_flight: dict[Any, tuple[int, str]] = {}
    attempts: collections.Counter[str] = collections.Counter()
    last_error = ""

    def submit(i: int) -> None:
        if abandoned[i] or time.monotonic() < retry_at[i] or any(j == i for j, _ in in_flight.values()):
            return
        if probing[i]:
            in_flight[actors[i].use.remote(cfg)] = (i, "probe")
            return
        batch = [queue.popleft() for _ in range(min(len(queue), cfg.envs_per_actor - len(held[i])))]
        if held[i] or batch:
            held[i].update(batch)
            engine = engines[engine_of[i]] if engines else None
            guide = guide_engines[guide_of[i]] if guide_engines else None
            in_flight[actors[i].advance.remote(batch, engine, guide)] = (i, "advance")

    told: dict[Any, int] = {}

    def tell_engines() -> None:
        for group, of in ((engines, engine_of), (guide_engines, guide_of)):
            for e, engine in enumerate(group):
                count = sum(len(held[i]) for i in range(n) if of[i] == e)
                if count != told.get(engine):
                    engine.expect.remote(count)  # (no wait for the answer: a late word only costs one batch's wait)
                    told[engine] = count

    while True:
        for i in range(n):
            submit(i)
        tell_engines()
        if not in_flight and (not queue or all(abandoned)):
            break
        ready = ray.wait(list(in_flight), num_returns=1, timeout=0.25)[0] if in_flight else []
        if not ready:
            time.sleep(0.05 if not in_flight else 0)  # only actors waiting out a back-off
        for ref in ready:
            i, kind = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                last_error = error_line(err)
                now = time.monotonic()
                if kind == "probe":  # still restarting: try again later; give up on an actor that never returns
                    retry_at[i], backoff[i] = now + backoff[i], min(2 * backoff[i], 5.0)
                    abandoned[i] = now - probe_since[i] > ACTOR_RESTART_TIMEOUT_S
                    continue
                failures[i] += 1
                summary.actor_failures += 1
                log.warning("env actor %d failed (%d/%d): %s; re-queueing its %d episodes", i, failures[i],
                            cfg.max_restarts, last_error, len(held[i]))
                for task_id in sorted(held[i]):
                    attempts[task_id] += 1
                    if attempts[task_id] >= cfg.max_attempts:  # not written: a rerun tries it again
                        summary.given_up.append(task_id)
                    else:
                        queue.appendleft(task_id)
                held[i].clear()
                abandoned[i] = failures[i] > cfg.max_restarts
                probing[i], probe_since[i], backoff[i], retry_at[i] = True, now, 0.25, now
                continue
            if kind == "probe":
                probing[i] = False
                continue
            for traj in result["finished"]:
                held[i].discard(traj.task_id)
                record(traj)
            summary.tokens_generated += result["tokens"]
            summary.engine_waits += result.get("engine_waits", 0)
            bar.add_steps(result["steps"])
    if queue or (summary.given_up and not summary.episodes):
        raise RuntimeError(f"env actors failed: {len(queue) + len(summary.given_up)} episodes not played (last "
                           f"error: {last_error}). Finished episodes are in the output: rerun to resume.")
    if summary.given_up:
        log.warning("%d episodes given up after %d failed attempts each (last error: %s); rerun to retry them",
                    len(summary.given_up), cfg.max_attempts, last_error)


class _Progress:
    """Episodes done, success so far and env steps/s (raysad.ui.Progress: a bar, or log lines)."""

    def __init__(self, total: int, enabled: bool, summary: RolloutSummary):
        from raysad.ui import Progress

        self.summary, self.steps, self.start = summary, 0, time.monotonic()
        self.progress = Progress("rollout", total, enabled, fields=("success", "rate"))

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.monotonic() - self.start
        self.progress.__exit__(*exc)

    def add_steps(self, n: int) -> None:
        self.steps += n
        self._refresh(0)

    def update(self) -> None:
        self._refresh(1)

    def _refresh(self, advance: int) -> None:
        s = self.summary
        rate = self.steps / max(time.monotonic() - self.start, 1e-9)
        success = f"success {s.successes / s.episodes:.0%}" if s.episodes else "success -"
        self.progress.update(advance, success=success, rate=f"{rate:.1f} steps/s")


def print_summary(summary: RolloutSummary, cfg: RolloutConfig) -> None:
    from raysad import ui
    from rich.table import Table

    table = Table(title=f"rollout: {cfg.env} ({cfg.split}), policy {cfg.policy}"
                        f"{' ' + cfg.model if cfg.model else ''}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    m = summary.metrics()
    rows = [("episodes played", f"{summary.episodes}"), ("already done (skipped)", f"{summary.skipped}"),
            ("written", f"{summary.written}" + (" (successful only)" if cfg.only_success else "")),
            ("success rate", f"{m['rollout/success_rate']:.1%}"), ("mean reward", f"{m['rollout/mean_reward']:.3f}"),
            ("mean steps", f"{m['rollout/mean_steps']:.1f}"), ("tokens generated", f"{summary.tokens_generated}"),
            ("playing time (after actor start-up)", f"{summary.wall_s:.1f} s"),
            ("episodes/s", f"{m['rollout/episodes_per_s']:.2f}"), ("env steps/s", f"{m['rollout/steps_per_s']:.1f}"),
            ("errors", f"{summary.errors}"),
            ("turns truncated (thought / action)",
             f"{summary.turns_truncated} of {summary.model_turns} ({summary.thoughts_truncated} / "
             f"{summary.actions_truncated})"),
            ("empty thoughts", f"{summary.empty_thoughts}"), ("env actor failures", f"{summary.actor_failures}"),
            ("given up (rerun retries)", f"{len(summary.given_up)}")]
    if summary.engine_waits:
        rows.append(("waits for a restarting engine", f"{summary.engine_waits}"))
    if summary.engine_calls:
        rows += [("engine: prompts per call", f"{m['rollout/engine_mean_batch']:.1f}"),
                 ("engine: busy", f"{m['rollout/engine_busy_frac']:.0%}")]
    rows.append(("output", summary.out))
    for row in rows:
        table.add_row(*row)
    ui.console().print(table)


def main(config_path: str | None = None, **flags: Any) -> RolloutSummary:
    """`raysad rollout`: the config from YAML + flags (flags win), the run, the summary table."""
    from raysad.config import build_config
    from raysad.ui import StageIncomplete

    cfg = build_config(RolloutConfig, config_path, **flags)
    summary = run_rollout(cfg)
    print_summary(summary, cfg)
    if summary.given_up:  # the output is short of what was asked: say so in the exit status too
        raise StageIncomplete(f"{len(summary.given_up)} of {len(summary.given_up) + summary.episodes + summary.skipped}"
                              f" episodes not played (their env actor failed {cfg.max_attempts} times); rerun the "
                              "same command to play them")
    return summary
