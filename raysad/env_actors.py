"""The env actor side of playing episodes: environments built inside Ray actors, each actor stepping many of
them and asking an engine actor for all their next turns in one batched request.

    worker = ray.remote(EnvWorker).remote(default_env_factory(cfg), n_envs=4, cfg=cfg)
    result = ray.get(worker.advance.remote(task_ids, engine))   # {"finished": [Trajectory], "steps", "tokens"}

Contexts are encoded here, with the model's tokenizer, exactly as training encodes them (encoding.encode_context
via policies.next_turns): ids go to the engine, ids come back. An env that raises, or an engine that fails on
one context, ends that episode with `extra["error"]`; a dead engine actor raises to the driver, which re-queues
the actor's episodes (raysad.rollout). No Ray placement here: the driver creates the actors (raysad.serving).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from raysad.configs import RolloutConfig
from raysad.policies.base import ENV_SIDE_POLICIES, make_policy
from raysad.serving import RemoteEngine, node_id
from raysad_envs.core import stable_hash


# --- environments and engines (built inside actors) -------------------------------------------------------

def env_kwargs(cfg: RolloutConfig) -> dict[str, Any]:
    """Constructor keywords of the environment: only what the config sets."""
    keys = {"split": cfg.split, "data": cfg.data, "num_tasks": cfg.num_tasks, "max_steps": cfg.max_turns}
    return {k: v for k, v in keys.items() if v is not None}


def token_budget(env, max_new_tokens: int | None, max_thought_tokens: int | None = None) -> tuple[int, int]:
    """(thought, action) token budgets of a model's turn: --max-new-tokens for both, else the env's own
    (env.token_budget; 128 each for an env that declares none); --max-thought-tokens, where set, for thoughts."""
    if max_new_tokens:
        thought, action = max_new_tokens, max_new_tokens
    else:
        thought, action = getattr(env.unwrapped, "token_budget", None) or (128, 128)
    return max_thought_tokens or thought, action


def default_env_factory(cfg: RolloutConfig) -> Callable[[], Any]:
    name, kwargs = cfg.env, env_kwargs(cfg)

    def make():
        import raysad_envs

        return raysad_envs.make(name, **kwargs)
    return make


# --- env actor ---------------------------------------------------------------------------------------------

@dataclass
class _Episode:
    task_id: str
    env: Any
    prompt: str
    instruction: str
    turns: list = dataclasses.field(default_factory=list)
    reward: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    truncated: bool = False
    error: str | None = None


class EnvWorker:
    """Steps `n_envs` environments; `advance` hands it tasks and returns the episodes that finished."""

    def __init__(self, make_env: Callable[[], Any], n_envs: int, cfg: RolloutConfig, return_after_s: float = 2.0):
        from raysad.agent_formats import format_record, get_format

        self.cfg = cfg
        self.node_id = node_id()  # written into each trajectory: which node played it
        self.free = [make_env() for _ in range(n_envs)]
        self.active: list[_Episode] = []
        self.pending: collections.deque[str] = collections.deque()
        self.engine = self.guide = None
        self.return_after_s = return_after_s
        self.env_policy = make_policy(cfg.policy, seed=cfg.seed) if cfg.policy in ENV_SIDE_POLICIES else None
        self.fmt = get_format(self.free[0].unwrapped.agent_format)
        self.format_record = format_record(self.fmt)  # every trajectory says how it was written
        if self.env_policy is None:  # a text engine: contexts are encoded here, as training encodes them
            from raysad.models import load_tokenizer
            from raysad.encoding import check_piecewise

            self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
            check_piecewise(self.tokenizer)
            self.budget = token_budget(self.free[0], cfg.max_new_tokens, cfg.max_thought_tokens)

    def ready(self) -> bool:
        return True

    def use(self, cfg: RolloutConfig) -> str | None:
        """Play the next run with `cfg` (its seed, temperature, top-k ...): every run says so before it starts
        (a caller may keep its env actors across runs: on-policy iterations), and after Ray restarted one (a
        restart builds it with its first run's settings). The envs stay; an episode an earlier run left
        unfinished is dropped. Returns the Ray node this actor runs on (the driver pairs it with an engine
        there, if there is one)."""
        if (cfg.policy in ENV_SIDE_POLICIES) != (self.env_policy is not None):
            raise ValueError(f"env actor built for policy {self.cfg.policy!r} cannot play with {cfg.policy!r}")
        self.cfg = cfg
        if self.env_policy is not None:
            self.env_policy = make_policy(cfg.policy, seed=cfg.seed)
        else:
            self.budget = token_budget(self.free[0] if self.free else self.active[0].env, cfg.max_new_tokens,
                                       cfg.max_thought_tokens)
        self.free.extend(e.env for e in self.active)
        self.active.clear()
        self.pending.clear()
        return self.node_id

    def advance(self, task_ids: list[str], engine=None, guide=None) -> dict:
        """Queue `task_ids`, then step all running episodes until one finishes, or `return_after_s` passes, or
        none is left. Returns {"finished": [Trajectory], "steps": n, "tokens": n, "engine_waits": n} (engine_waits:
        engine actor restarts this call waited out). `engine`: the engine actor
        to ask (None: the expert). It comes with every call rather than at construction: Ray cannot promise
        restarts of an actor created with an actor handle argument (ray-project/ray#53727). A local engine
        (not an actor handle) is called directly: the same stepping in one process, without Ray
        (benchmarks/rollout_throughput.py measures the pool against it). `guide`: the engine (actor) of the model
        that plays the turns cfg.guide_turns / cfg.guide_share give it (on-policy curricula: the teacher)."""
        self.engine = RemoteEngine(engine) if isinstance(engine, ray.actor.ActorHandle) else engine
        self.guide = RemoteEngine(guide) if isinstance(guide, ray.actor.ActorHandle) else guide
        if self.guide is None and (self.cfg.guide_turns or self.cfg.guide_share):
            raise ValueError("guide_turns / guide_share need a guide engine (the driver starts one for cfg.guide)")
        self.pending.extend(task_ids)
        finished, steps, tokens = [], 0, 0
        start = time.monotonic()
        try:
            while True:
                while self.free and self.pending:
                    episode = self._start(self.free.pop(), self.pending.popleft())
                    if episode.error is None:
                        self.active.append(episode)
                    else:
                        finished.append(self._finish(episode))
                if not self.active or finished or time.monotonic() - start > self.return_after_s:
                    return {"finished": finished, "steps": steps, "tokens": tokens,
                            "engine_waits": sum(getattr(e, "restarts_waited", 0) for e in (self.engine, self.guide))}
                done, step_tokens = self._step_all()
                steps += len(self.active) + len(done)
                tokens += step_tokens
                finished.extend(self._finish(e) for e in done)
        except BaseException:
            # The driver re-queues every task this actor held when a call fails, so forget them all here.
            self.free.extend(e.env for e in self.active)
            self.active.clear()
            self.pending.clear()
            raise

    def _start(self, env, task_id: str) -> _Episode:
        try:
            seed = int(stable_hash(self.cfg.seed, task_id), 16) % 2**31
            obs, info = env.reset(seed=seed, options={"task_id": task_id})
            prompt = env.unwrapped.prompt(obs, few_shot=self.cfg.few_shot)
            if self.cfg.chat_template and self.env_policy is None:
                from raysad.encoding import chat_prompt

                prompt = chat_prompt(self.tokenizer, prompt)
            instruction = info.get("instruction") or info.get("question") or obs  # the task, as the env words it
            return _Episode(task_id, env, prompt, str(instruction), info=info)
        except Exception as err:  # noqa: BLE001 -- a broken task ends its episode, not the job
            return _Episode(task_id, env, "", "", error=f"reset: {type(err).__name__}: {err}")

    def _step_all(self) -> tuple[list[_Episode], int]:
        """One turn for every active episode; returns the episodes that ended and the tokens generated."""
        if self.engine is None:  # an env-side policy: the expert or the random baseline
            turns = []
            for e in self.active:  # one env at a time, so that an expert that raises ends only its episode
                try:
                    turns += self.env_policy.next_turns([e.env])
                except Exception as err:  # noqa: BLE001
                    e.error = f"{self.cfg.policy}: {type(err).__name__}: {err}"
                    turns.append(None)
        else:
            guided = [self.guide is not None and self._guide_plays(e) for e in self.active]
            if not any(guided):
                turns = self._generate(self.engine, self.active)
            else:  # the two models' batches at once: each engine batches them with other env actors' prompts
                own = [e for e, g in zip(self.active, guided) if not g]
                theirs = [e for e, g in zip(self.active, guided) if g]
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    own_turns = pool.submit(self._generate, self.engine, own)
                    guide_turns = pool.submit(self._generate, self.guide, theirs)
                    mine, guides = iter(own_turns.result()), iter(guide_turns.result())
                turns = [next(guides) if g else next(mine) for g in guided]
                for turn, g in zip(turns, guided):
                    if g and turn is not None:
                        turn.extra["guide"] = True  # context for the student: no loss (encoding)
        tokens, done, still = 0, [], []
        for e, turn in zip(self.active, turns):
            if turn is not None:
                tokens += len(turn.token_ids or ())
                try:
                    obs, reward, terminated, truncated, info = e.env.step(turn.action)
                    turn.observation = obs
                    turn.extra["invalid_action"] = bool(info.get("invalid_action", False))
                    e.turns.append(turn)
                    e.reward += reward
                    # a run's turn limit below the env's own (on-policy depth curriculum): end it as the env would
                    truncated = truncated or bool(self.cfg.turn_limit and len(e.turns) >= self.cfg.turn_limit)
                    e.info, e.truncated = info, truncated and not terminated
                    if not (terminated or truncated):
                        still.append(e)
                        continue
                except Exception as err:  # noqa: BLE001 -- the env failed on this step: end the episode
                    e.turns.append(turn)
                    e.error = f"step: {type(err).__name__}: {err}"
            done.append(e)
        self.active = still
        return done, tokens

    def _guide_plays(self, e: _Episode) -> bool:
        """Whether the guide plays the episode's next turn: one of its first cfg.guide_turns, or a draw (fixed by
        the run's seed, the task and the turn: a replayed episode draws the same) below cfg.guide_share."""
        n = len(e.turns)
        if n < self.cfg.guide_turns:
            return True
        return bool(self.cfg.guide_share) and (
            int(stable_hash(self.cfg.seed, e.task_id, n, "guide"), 16) / 16**12 < self.cfg.guide_share)

    def _generate(self, engine, episodes: list[_Episode]) -> list:
        """The next turn of each episode from `engine`; an episode whose context it fails on gets None (and its
        error), the others their turn."""
        from raysad.policies.base import next_turns

        cfg = self.cfg

        def generate(some):
            return next_turns(engine, self.tokenizer, self.fmt, [e.prompt for e in some], [e.turns for e in some],
                              topk=cfg.topk, max_thought_tokens=self.budget[0], max_action_tokens=self.budget[1],
                              temperature=cfg.temperature)
        if not episodes:
            return []
        try:
            return generate(episodes)
        except ray.exceptions.RayActorError:
            raise  # the engine actor died: the driver re-queues this actor's episodes
        except Exception:  # noqa: BLE001 -- one bad context (e.g. too long) must not end the whole batch
            turns = []
            for e in episodes:
                try:
                    turns += generate([e])
                except ray.exceptions.RayActorError:
                    raise
                except Exception as err:  # noqa: BLE001
                    e.error = f"generate: {error_line(err)}"
                    turns.append(None)
            return turns

    def _finish(self, e: _Episode):
        from raysad.trajectory import Trajectory

        self.free.append(e.env)
        metrics = {k: e.info[k] for k in ("score", "em", "f1", "won") if k in e.info}
        extra: dict[str, Any] = {"steps": len(e.turns), "truncated": e.truncated, "metrics": metrics,
                                 "agent_format": self.format_record}
        if e.error is not None:
            extra["error"] = e.error
        if self.node_id is not None:
            extra["node_id"] = self.node_id
        cfg = self.cfg
        traj = Trajectory(
            id=f"{cfg.env}/{cfg.split}/{e.task_id}", env=cfg.env, task_id=e.task_id, split=cfg.split,
            instruction=e.instruction, prompt=e.prompt, turns=e.turns, reward=float(e.reward),
            success=bool(e.info.get("success", False)) and e.error is None,
            policy={"backend": cfg.policy, "model": cfg.model or cfg.policy}, extra=extra)
        if cfg.context_topk and self.engine is not None and e.error is None:
            from raysad.scoring import score_trajectories

            try:  # the model's rows at the tokens it read but did not write (flat_kd offline)
                score_trajectories([traj], self.tokenizer, self.engine, cfg.topk, generated=False, context=True)
            except ray.exceptions.RayActorError:
                raise  # the engine actor died: the driver re-queues this actor's episodes
            except Exception as err:  # noqa: BLE001 -- this episode is left for a rerun, not the whole job
                traj.extra["error"], traj.success = f"context scoring: {error_line(err)}", False
        return traj


def error_line(err: BaseException) -> str:
    """The last line of an error (a Ray error carries the remote traceback; its last line says what happened),
    its exception named without its module (`raysad.config.MissingExtra: ...` -> `MissingExtra: ...`)."""
    lines = str(err).strip().splitlines()
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[-1].strip()) if lines else type(err).__name__
