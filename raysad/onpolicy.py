"""On-policy, multi-turn SAD (`raysad onpolicy`): the student plays, the teacher scores the student's own
tokens, and the student learns from them segment by segment, iteration after iteration.

    from raysad.onpolicy import OnPolicyConfig, run_onpolicy
    result = run_onpolicy(OnPolicyConfig(student="derive:keep_every=4", teacher="runs/teacher", env="hotpotqa",
                                         iterations=4, episodes=16, max_steps=8))
    result.student, result.iterations        # the last student's HF folder, each iteration's metrics

Iteration k (folder <out>/iter_<k>):
  1. play       the current student plays `episodes` train tasks (the split's tasks in turn, so every iteration
                meets new ones) on Ray env actors through its engine actors (raysad.rollout), sampling at
                `sample_temperature`: trajectories.jsonl holds the ids it generated, per turn.
  2. score and  raysad.distill on those trajectories with the teacher online: encoding.encode_trajectory reuses
     train      the student's stored ids (token-in, token-out), so the teacher's forward pass reads exactly the
                tokens the student wrote and gives its full distribution at each; the student minimises
                λ_r·D(reason) + λ_a·D(act) over its own thought and action tokens (reverse KL by default, the
                on-policy divergence; forward KL and JSD too; `method token_kd` is the vanilla one-loss
                baseline) for `max_steps` steps -> student/, the next iteration's policy. With
                `teacher_trajectories`, `teacher_share` of the iteration's trajectories are the teacher's own
                (off-policy examples, GKD's λ).
  Weight sync: the student's engine actors (hf or vLLM) are started once; before each iteration plays they
  load its player's weights from disk (`EngineActor.load_weights`: HFEngine swaps its model, VLLMEngine reloads
  the weights in place on its workers). With `max_staleness 0` the loop is
  synchronous (every sample comes from the weights being trained); with 1, iteration k+1 is played (in a
  thread, same Ray cluster) while iteration k trains, by the weights of iteration k-1 (`player_of`; staleness
  logged per iteration). Each iteration starts a fresh AdamW (its learning rate warms up in the first only).

Curricula (`curriculum`, linear over `curriculum_iterations`): TCOD's depth curriculum, b2f (the teacher plays
each episode's first turns, the student the rest, the teacher's part shrinking to none) or f2b (the student
plays the first turns and the episode ends there, the depth growing to the horizon); and a teacher take-over
share (each student turn is the teacher's with a probability that decays to 0). The teacher plays through its
own engine actors (the rollout's guide); its turns are context in training (no loss).

Resume: each iteration's rollout and distillation resume on their own (raysad.rollout, raysad.distill), and a
finished iteration leaves iter_<k>/done.json; a rerun of the same command continues from the first unfinished
iteration, in the same MLflow run. Settings that change what is computed are recorded in
<out>/onpolicy.settings.json; a rerun with others is refused (`iterations` may grow).

MLflow: one run (stage onpolicy) with per-iteration metrics `onpolicy/*`: the student's train success rate
(with a curriculum, of episodes the teacher partly played), the student's and the teacher's turns, the
per-segment divergence of the iteration's last step (reason / act), tokens trained, staleness, and the time
split (play, score + train: with an online teacher the scoring is the teacher's forward inside each step).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysad.config import values_of, write_json
from raysad.configs import (DistillConfig, Distillation, OnPolicyConfig, Optimizer, Play, RayCluster, RolloutConfig,
                            Training, Workers)

log = logging.getLogger(__name__)

SETTINGS_FILE = "onpolicy.settings.json"
RUN_ID_FILE = "mlflow_run_id"
DONE_FILE = "done.json"
PLAYER_FILE = "player.json"   # the weights (and seed) the student's engine actors play with now
# settings a rerun may change: how far to go and where it runs, not what an iteration computes
RESUME_MAY_CHANGE = ("iterations", "experiment", "run_name", "tracking_uri", "ray_address", "num_cpus",
                     "env_actors", "envs_per_actor", "engines", "workers")


@dataclass
class OnPolicyResult:
    student: Path                                   # the last iteration's student (HF folder)
    iterations: list[dict[str, float]] = field(default_factory=list)  # each iteration's onpolicy/* metrics
    run_id: str | None = None


def iteration_dir(out: str | Path, k: int) -> Path:
    return Path(out) / f"iter_{k:03d}"


def iteration_tasks(pool: list[str], k: int, episodes: int) -> list[str]:
    """The tasks iteration k plays: the next `episodes` of the pool, wrapping around, so that successive
    iterations meet new tasks and the whole split is used before any task repeats."""
    if not pool:
        raise ValueError("the split has no tasks to play")
    start = (k * episodes) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(min(episodes, len(pool)))]


def teacher_plays(cfg: OnPolicyConfig) -> bool:
    """Whether the teacher plays turns (b2f depth curriculum, take-over): it then has engine actors too."""
    return cfg.depth_curriculum == "b2f" or cfg.teacher_takeover > 0


def curriculum(cfg: OnPolicyConfig, k: int, horizon: int) -> dict[str, Any]:
    """Iteration k's share of the play between teacher and student, as rollout settings.

    Over C = curriculum_iterations (default: all) iterations the depth the student is exposed to grows
    linearly, ceil(horizon·(k+1)/C) turns of the episode's `horizon` (its max turns), full from iteration C on
    (TCOD): b2f, the teacher plays the first horizon − depth turns and the student the rest; f2b, the student
    plays the first `depth` turns and the episode ends there. Take-over: each of the student's turns is the
    teacher's with probability teacher_takeover·(1 − k/C), 0 from iteration C on."""
    c = cfg.curriculum_iterations or cfg.iterations
    depth = min(horizon, -(-horizon * (k + 1) // c))
    return {"guide": cfg.teacher if teacher_plays(cfg) else None,
            "guide_turns": horizon - depth if cfg.depth_curriculum == "b2f" else 0,
            "turn_limit": depth if cfg.depth_curriculum == "f2b" and depth < horizon else None,
            "guide_share": cfg.teacher_takeover * max(0.0, 1 - k / c)}


def play_config(cfg: OnPolicyConfig, k: int, student: str, task_ids: list[str],
                horizon: int | None = None) -> RolloutConfig:
    """Iteration k's rollout: the student samples on the iteration's tasks, with its own seed; with a curriculum
    (horizon: the episodes' max turns) the teacher plays its share."""
    settings = values_of(cfg, Play, RayCluster)
    settings.update(env=cfg.env, split=cfg.split, data=cfg.data, num_tasks=cfg.num_tasks, max_turns=cfg.max_turns,
                    task_ids=task_ids, policy=cfg.engine, model=student, temperature=cfg.sample_temperature, topk=0,
                    seed=cfg.seed * 1_000 + k, out=str(iteration_dir(cfg.out, k) / "trajectories.jsonl"))
    if horizon is not None:
        settings.update(curriculum(cfg, k, horizon))
    elif teacher_plays(cfg):
        settings["guide"] = cfg.teacher
    return RolloutConfig(**settings)


def horizon_of(cfg: OnPolicyConfig) -> int:
    """The depth the curriculum grows to: the episodes' max turns (--max-turns, else the env's own: one env built
    to ask); for b2f, where the teacher plays the first turns, the teacher's median episode length in
    --teacher-trajectories when given (a teacher that finishes in 4 turns of 8 would otherwise play whole episodes
    in the first iterations), at most the max turns."""
    limit = cfg.max_turns
    if not limit:
        from raysad.env_actors import default_env_factory

        limit = int(default_env_factory(play_config(cfg, 0, cfg.teacher, []))().unwrapped.max_steps)
    if cfg.depth_curriculum != "b2f" or not cfg.teacher_trajectories:
        return limit
    from raysad.trajectory_reader import read_trajectories

    with read_trajectories(cfg.teacher_trajectories) as reader:
        lengths = sorted(len(t.turns) for t in reader)
    if not lengths:
        raise ValueError(f"--teacher-trajectories {cfg.teacher_trajectories}: no trajectories")
    return max(1, min(limit, lengths[len(lengths) // 2]))


def train_config(cfg: OnPolicyConfig, k: int, student: str, data: Path) -> DistillConfig:
    """Iteration k's distillation: the student on its own trajectories, the teacher online (or, teacher_topk,
    its stored top-k rows)."""
    settings = values_of(cfg, Distillation, Training, Workers, Optimizer, RayCluster)
    if cfg.teacher_topk:
        settings["teacher"] = None
    steps = max(cfg.max_steps, 1)
    settings.update(trajectories=str(data), student=student, out=str(iteration_dir(cfg.out, k) / "student"),
                    warmup_steps=cfg.warmup_steps if k == 0 else 0, seed=cfg.seed * 1_000 + k,
                    checkpoint_every=steps, log_every=steps, stage="onpolicy")
    return DistillConfig(**settings)


SCORE_BATCH = 8  # trajectories per scoring request


def score(cfg: OnPolicyConfig, played: Path, engines: list) -> Path:
    """The played trajectories with the teacher's top-k rows (cfg.teacher_topk) on every token a model generated
    (flat_kd: on every token after the first generated one), from the teacher's engine actors over exactly the
    ids training will read (raysad.scoring): <iteration>/scored.jsonl, written once (a rerun finds it)."""
    from raysad import models
    from raysad.losses import get_method
    from raysad.scoring import score_trajectories
    from raysad.serving import RemoteEngine
    from raysad.trajectory_reader import read_trajectories
    from raysad.trajectory_writer import TrajectoryWriter

    out, tmp = played.with_name("scored.jsonl"), played.with_name("scored.tmp.jsonl")
    if out.is_file():
        return out
    tokenizer = models.load_tokenizer(cfg.teacher)
    remotes = [RemoteEngine(e) for e in engines]
    context = get_method(cfg.method).flat

    def score_batch(batch: list) -> None:
        shares = [batch[i::len(remotes)] for i in range(len(remotes))]
        with concurrent.futures.ThreadPoolExecutor(len(remotes)) as pool:
            list(pool.map(lambda pair: score_trajectories(pair[1], tokenizer, pair[0], cfg.teacher_topk,
                                                          context=context), zip(remotes, shares)))

    with read_trajectories(played) as reader, TrajectoryWriter(tmp) as writer:
        batch: list = []
        for traj in reader:
            batch.append(traj)
            if len(batch) == SCORE_BATCH:
                score_batch(batch)
                for t in batch:
                    writer.write(t)
                batch = []
        if batch:
            score_batch(batch)
            for t in batch:
                writer.write(t)
    tmp.replace(out)
    return out


def mix_in_teacher(cfg: OnPolicyConfig, k: int, played: Path) -> tuple[Path, int]:
    """The iteration's training file and how many teacher trajectories it holds: the student's trajectories,
    plus (teacher_share > 0) the next run of the teacher's trajectories, cycling through that file. Both files
    are streamed, never held whole."""
    if not cfg.teacher_trajectories or not cfg.teacher_share:
        return played, 0
    from raysad.trajectory_reader import count_trajectories, read_trajectories
    from raysad.trajectory_writer import TrajectoryWriter

    wanted = round(count_trajectories(played) * cfg.teacher_share / (1 - cfg.teacher_share))
    total = count_trajectories(cfg.teacher_trajectories)
    if not total:
        raise ValueError(f"--teacher-trajectories {cfg.teacher_trajectories}: no trajectories")
    if wanted > total:
        log.warning("iteration %d: --teacher-share %g asks for %d teacher trajectories, %s holds %d: each is used "
                    "once", k, cfg.teacher_share, wanted, cfg.teacher_trajectories, total)
    picked = {(k * wanted + i) % total for i in range(min(wanted, total))}
    path, tmp = played.with_name("train.jsonl"), played.with_name("train.tmp.jsonl")  # (the suffix names the format)
    with TrajectoryWriter(tmp) as out:
        for source, keep in ((played, None), (cfg.teacher_trajectories, picked)):
            with read_trajectories(source) as reader:
                for i, traj in enumerate(reader):
                    if keep is None or i in keep:
                        out.write(traj)
    tmp.replace(path)
    return path, len(picked)


def play_counts(path: Path) -> dict[str, float]:
    """What the iteration's episodes hold: success rate, the student's and the teacher's turns, and episodes in
    which the student played no turn (nothing to learn from: b2f's teacher finished within its part)."""
    from raysad.trajectory_reader import read_trajectories

    episodes = successes = student = teacher = idle = 0
    with read_trajectories(path) as reader:
        for t in reader:
            guided = sum(bool(turn.extra.get("guide")) for turn in t.turns)
            episodes, successes = episodes + 1, successes + bool(t.success)
            student, teacher = student + len(t.turns) - guided, teacher + guided
            idle += bool(t.turns) and guided == len(t.turns)  # (an episode that errored at reset has no turns)
    return {"onpolicy/train_success_rate": successes / episodes if episodes else 0.0,
            "onpolicy/student_turns": student, "onpolicy/teacher_turns": teacher,
            "onpolicy/episodes_without_student_turns": idle}


class CurrentPlayer:
    """The engine factory of the student's engine actors: it builds the engine on the weights the run plays
    with now (the folder and seed in <out>/PLAYER_FILE), so an engine actor that Ray restarts after its process
    died comes back as the current player, not as the first one."""

    def __init__(self, cfg: RolloutConfig, pointer: Path):
        self.cfg, self.pointer = cfg, str(pointer)

    def point(self, model: str, seed: int) -> None:
        """Record the weights the engines are about to load (before they load them)."""
        write_json(self.pointer, {"model": str(model), "seed": seed})

    def __call__(self):
        from raysad.serving import default_engine_factory

        current = json.loads(Path(self.pointer).read_text())
        return default_engine_factory(dataclasses.replace(self.cfg, model=current["model"], seed=current["seed"]))()


@dataclasses.dataclass
class Players:
    """What the iterations play on, started once for the whole run: the env actors (their envs made once), the
    engine actors with the current player's weights and, when the teacher plays turns or scores them
    (teacher_topk), the teacher's."""
    env_actors: list
    engines: list | None = None
    current: CurrentPlayer | None = None
    teacher_engines: list | None = None

    def stop(self) -> None:
        _kill(self.env_actors + (self.engines or []) + (self.teacher_engines or []))


def _kill(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def start_players(cfg: OnPolicyConfig, student: str) -> Players:
    """The env actors and engine actors the student plays on (and the teacher's, if it plays or scores), for
    the whole run: each iteration swaps in
    its player's weights (weight sync) and its settings, where fresh actors per iteration paid their start-up
    every time. An engine without a GPU reserves no CPU: it shares the cores with training, which playing ahead
    overlaps it with."""
    import ray

    from raysad.rollout import start_env_actors, start_guides, start_rollout_engines

    rcfg = play_config(cfg, 0, student, [])
    env_actors = start_env_actors(rcfg, cfg.env_actors)
    player = CurrentPlayer(rcfg, Path(cfg.out) / PLAYER_FILE)
    player.point(student, rcfg.seed)
    episodes = cfg.episodes or cfg.env_actors * cfg.envs_per_actor
    engines = start_rollout_engines(rcfg, player, cfg.env_actors, episodes, reserve_cpus=False)
    teacher = (start_guides(dataclasses.replace(rcfg, guide=cfg.teacher), cfg.env_actors, episodes)
               if teacher_plays(cfg) or cfg.teacher_topk else None)
    ray.get([e.ready.remote() for e in engines + (teacher or [])])
    return Players(env_actors, engines, player, teacher)


def play(cfg: OnPolicyConfig, k: int, player: str, pool: list[str], progress: bool, players: Players | None = None,
         horizon: int | None = None):
    """Iteration k's episodes, played by `player` (resumes a partly played iteration) on the run's actors: its
    engine actors after loading the player's weights (with the iteration's seed, as a fresh engine would
    sample), else on new engines; the teacher plays its share of the turns (curriculum)."""
    from raysad.rollout import run_rollout

    rcfg = play_config(cfg, k, player, iteration_tasks(pool, k, cfg.episodes), horizon)
    if players is not None and players.engines is not None:
        import ray

        players.current.point(player, rcfg.seed)
        ray.get([e.load_weights.remote(str(player), rcfg.seed) for e in players.engines])
    return run_rollout(rcfg, engines=players.engines if players else None,
                       env_actors=players.env_actors if players else None,
                       guides=players.teacher_engines if players and teacher_plays(cfg) else None,
                       progress=progress, track=False)


def train(cfg: OnPolicyConfig, k: int, student: str, played, waited_s: float, horizon: int | None = None,
          players: Players | None = None) -> dict[str, float]:
    """Score + train on iteration k's episodes; returns its metrics (also written to iter_<k>/done.json)."""
    from raysad.distill import run_distill

    began = time.monotonic()
    path = Path(played.out)
    counts = play_counts(path)
    scored, score_s = path, None
    if cfg.teacher_topk:
        scored = score(cfg, path, players.teacher_engines)
        score_s = time.monotonic() - began
    data, mixed = mix_in_teacher(cfg, k, scored)
    if counts["onpolicy/student_turns"] == 0 and counts["onpolicy/teacher_turns"] and not mixed:
        raise RuntimeError(f"iteration {k}: the student played no turn in {path}, the teacher played them all "
                           "(nothing to learn from): start the depth curriculum shallower with more "
                           "--curriculum-iterations, or lower --teacher-takeover")
    if counts["onpolicy/episodes_without_student_turns"]:
        log.warning("iteration %d: in %d of %d episodes the teacher played every turn (they add no loss)", k,
                    counts["onpolicy/episodes_without_student_turns"], played.episodes + played.skipped)
    trained = run_distill(train_config(cfg, k, student, data), track=False)
    m = trained.metrics
    metrics = {"onpolicy/iteration": k, **counts,
               "onpolicy/episodes": played.episodes + played.skipped, "onpolicy/teacher_trajectories": mixed,
               "onpolicy/play_s": played.wall_s, "onpolicy/wait_for_play_s": waited_s,
               "onpolicy/score_s": score_s, "onpolicy/score_train_s": time.monotonic() - began,
               # iterations between the weights that played these episodes and the weights trained on them
               "onpolicy/staleness": float(min(k, cfg.max_staleness)),
               "onpolicy/tokens_trained": float(sum(r.get("reason_tokens", 0) + r.get("act_tokens", 0)
                                                    for r in trained.log)),
               "onpolicy/loss": m.get("distill/loss"), "onpolicy/reason_divergence": m.get("distill/reason_loss"),
               "onpolicy/act_divergence": m.get("distill/act_loss"), "onpolicy/steps": float(trained.steps)}
    if horizon is not None:  # the curriculum's settings this iteration played with
        share = curriculum(cfg, k, horizon)
        metrics.update({"onpolicy/teacher_prefix_turns": share["guide_turns"],
                        "onpolicy/turn_limit": share["turn_limit"] or horizon,
                        "onpolicy/takeover_share": share["guide_share"]})
    metrics = {k_: float(v) for k_, v in metrics.items() if v is not None}
    write_json(iteration_dir(cfg.out, k) / DONE_FILE, {"student": str(trained.out), "metrics": metrics})
    # a finished iteration is never resumed: its checkpoints (a model and optimizer copy each) only take disk
    shutil.rmtree(Path(trained.out) / "checkpoints", ignore_errors=True)
    return metrics


def player_of(k: int, staleness: int, first: str, trained: list[str]) -> str:
    """The student that plays iteration k: the one trained `staleness` iterations before the newest, so that
    with staleness 1 iteration k+1 can be played while iteration k trains. (A pure function of k: a resumed
    run plays every iteration with the same weights it would have.)"""
    j = k - 1 - staleness
    return trained[j] if j >= 0 else first


def check_settings(cfg: OnPolicyConfig) -> None:
    """Refuse to continue an <out> started with settings that change what an iteration computes."""
    from raysad.config import changed_settings, record_settings

    path = Path(cfg.out) / SETTINGS_FILE
    settings = dataclasses.asdict(cfg)
    changes = changed_settings(path, settings, ignore=RESUME_MAY_CHANGE)
    if changes:
        raise ValueError(f"{cfg.out} holds an on-policy run with other settings ({', '.join(changes)}); rerun with "
                         "the same settings to continue it, or pass a fresh --out")
    record_settings(path, settings)


def run_onpolicy(cfg: OnPolicyConfig, track: bool = True, progress: bool = True) -> OnPolicyResult:
    """Run (or continue) the iterations; returns the last student and every iteration's metrics."""
    import contextlib

    from raysad import models, tracking, ui
    from raysad.cluster import init_ray
    from raysad.config import flatten
    from raysad.rollout import select_tasks
    from raysad.students import student_dir

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)
    student = student_dir(cfg.student, cfg.teacher, cfg.out)
    for role, path in (("--student", student), ("--teacher", cfg.teacher)):
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{role} {path}: not a model directory (no config.json)")
    # the teacher scores the student's token ids: both must mean the same by every id (checked before any play)
    models.check_same_tokenizer(models.load_tokenizer(cfg.teacher), models.load_tokenizer(student))
    pool = select_tasks(dataclasses.replace(play_config(cfg, 0, student, []), task_ids=cfg.task_ids, episodes=None))
    result = OnPolicyResult(student=Path(student))
    run = contextlib.nullcontext()
    if track:
        uri = tracking.absolute_uri(cfg.tracking_uri)
        run = tracking.resumable_run(out / RUN_ID_FILE, cfg.experiment, uri,
                                     cfg.run_name or f"onpolicy-{cfg.method}-{cfg.env}", flatten(cfg),
                                     {"stage": "onpolicy", "method": cfg.method, "env": cfg.env})
    horizon = horizon_of(cfg) if cfg.depth_curriculum != "off" or cfg.teacher_takeover else None
    started_ray = init_ray(cfg.ray_address, cfg.num_cpus)
    players = start_players(cfg, student)
    first, trained = student, []
    ahead: dict[int, Any] = {}  # iteration -> its play, started while the previous iteration trains
    pool_ahead = concurrent.futures.ThreadPoolExecutor(1) if cfg.max_staleness else None
    try:
        with run as active:
            result.run_id = active.info.run_id if active is not None else None
            for k in range(cfg.iterations):
                done = iteration_dir(out, k) / DONE_FILE
                if done.is_file():  # finished before an interruption: its student is the next one's policy
                    record = json.loads(done.read_text())
                    trained.append(record["student"])
                    result.iterations.append(record["metrics"])
                    continue
                student = trained[-1] if trained else first
                waited = time.monotonic()
                played = (ahead.pop(k).result() if k in ahead
                          else play(cfg, k, player_of(k, cfg.max_staleness, first, trained), pool, progress, players,
                                    horizon))
                waited = time.monotonic() - waited
                nxt = k + 1
                if pool_ahead is not None and nxt < cfg.iterations and not (iteration_dir(out, nxt) / DONE_FILE).is_file():
                    ahead[nxt] = pool_ahead.submit(play, cfg, nxt, player_of(nxt, cfg.max_staleness, first, trained),
                                                   pool, False, players, horizon)
                metrics = train(cfg, k, student, played, waited, horizon, players)
                trained.append(json.loads(done.read_text())["student"])
                if active is not None:
                    tracking.log_metrics(metrics, step=k)
                result.iterations.append(metrics)
                ui.console().print(
                    f"onpolicy iteration {k + 1}/{cfg.iterations}: train success "
                    f"{metrics['onpolicy/train_success_rate']:.1%}, reason {metrics.get('onpolicy/reason_divergence', 0):.4f}, "
                    f"act {metrics.get('onpolicy/act_divergence', 0):.4f}, play {metrics['onpolicy/play_s']:.0f} s "
                    f"(waited {waited:.0f} s), score+train {metrics['onpolicy/score_train_s']:.0f} s", highlight=False)
    finally:
        if pool_ahead is not None:
            pool_ahead.shutdown(wait=True, cancel_futures=True)
        players.stop()
        if started_ray:
            import ray

            ray.shutdown()
    student = trained[-1] if trained else first
    result.student = _publish(out, Path(student))
    return result


def _publish(out: Path, student: Path) -> Path:
    """<out>/student: the last iteration's student (a copy, replaced atomically)."""
    final = out / "student"
    tmp = out / "student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(student, tmp, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def main(config_path: str | Path | None = None, **flags: Any) -> OnPolicyResult:
    """`raysad onpolicy`: the config (defaults < YAML < flags), the iterations, where the student went."""
    from raysad import ui
    from raysad.config import build_config

    cfg = build_config(OnPolicyConfig, config_path, **flags)
    result = run_onpolicy(cfg)
    ui.console().print(f"[green]onpolicy[/green] ({cfg.method}, {cfg.divergence}): {len(result.iterations)} "
                       f"iterations, student saved to [bold]{result.student}[/bold]")
    return result
