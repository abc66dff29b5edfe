"""ALFWorld as a gymnasium text environment, on ALFWorld's own engine (TextWorld PDDL + AlfredDemangler).

    env = ALFWorldEnv(split="test")                          # generated games, no download needed
    env = ALFWorldEnv(split="test", data="~/alfworld_data")  # the real json_2.1.1 games (or data="env")
    obs, info = env.reset(seed=0)
    thought, action = env.expert_turn()
    obs, reward, terminated, truncated, info = env.step(action)

Actions are ALFWorld's commands ("go to cabinet 1", "take mug 1 from cabinet 1", "move mug 1 to countertop 1").
"put X in/on Y" and "move X to Y" are accepted for one another, whichever the game's grammar uses (ALFWorld
>= 0.4 says "move ... to", the real 2.1.1 game files "put ... in/on"). "think: ..." answers "OK." as in ReAct
and changes nothing (it still costs a step). Anything else that is not admissible gets ALFWorld's own answer,
"Nothing happens.", with info["invalid_action"] = True: we keep the engine's text rather than the base class's
"Invalid action: ..." so that transcripts look like ALFWorld's. The metric is success (info["won"]).
"""
from __future__ import annotations

import json
import random
import re

import gymnasium as gym

from ..core import TextEnv, cache_dir, stable_hash
from .engine import Engine
from .expert import Expert
from .generator import GENERATOR_VERSION, TASK_TYPES, generate_task, write_trial
from .tasks import catalog, read_traj_data

NOTHING_HAPPENS = "Nothing happens."
THINK_ACK = "OK."
EXAMPLES_SEED = "react-examples"   # held-out generator seed: example games never collide with a task pool
_NUMBER_WORDS = {1: "one example", 2: "two examples", 3: "three examples", 4: "four examples", 5: "five examples"}
_PUT = re.compile(r"(?:put|move|place) (.+?) (?:in/on|into|in|on|onto|to) (.+)")


class ALFWorldEnv(TextEnv):
    env_name = "alfworld"
    agent_format = "alfworld"
    default_max_steps = 50
    token_budget = (192, 32)  # expert, 300 train episodes, SmolLM2's tokenizer: thought max 118, action max 13

    def __init__(self, split: str = "train", data=None, seed: int = 0, num_tasks: int | None = None,
                 max_steps: int | None = None, render_mode: str | None = None):
        """split: train/valid/test. data: None = offline generated games (deterministic, the default; the
        ALFWORLD_DATA variable is NOT read unless data="env"), or a path to a real ALFWorld data root.
        seed: draws the generated pool and its split. num_tasks: generated pool size over all splits
        (default 1000), or for real data the first num_tasks games of the split."""
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        # unseeded resets follow the constructor's seed, so a run replays from its config
        self._np_random, _ = gym.utils.seeding.np_random(seed)
        self.data, self.seed, self.num_tasks = data, seed, num_tasks
        self._catalog = catalog(split, data, seed, num_tasks)
        self.skipped = dict(self._catalog.skipped)   # real data: unplayable trials by reason
        self._engine: Engine | None = None
        self._expert: Expert | None = None
        self._expert_cache: tuple[int, tuple[str, str]] | None = None
        self.task_type = ""
        self._params: dict = {}

    # --- TextEnv ------------------------------------------------------------------------------------------
    def task_ids(self) -> list[str]:
        return list(self._catalog.ids)

    def _load_task(self, task_id: str) -> tuple[str, dict]:
        trial = self._catalog.trial_dir(task_id)
        traj = read_traj_data(trial)
        self.task_type, self._params = traj.get("task_type", ""), traj.get("pddl_params", {})
        if self._engine is None:
            self._engine = Engine()
        obs = self._engine.start(str(trial / "game.tw-pddl"))
        # the expert's choices (routes, templates) follow the reset seed, so a seeded reset replays exactly
        rng = random.Random(stable_hash(self.seed, task_id, int(self.np_random.integers(2**31))))
        self._expert = Expert(self.task_type, self._params, rng, self._engine)
        self._expert_cache = None
        return obs, {"won": False, "task_type": self.task_type}

    def _apply(self, action: str) -> tuple[str, float, bool, dict]:
        if self._engine is None:
            raise RuntimeError("alfworld: the environment was closed; call reset() to play again")
        info = {"won": self._engine.won, "task_type": self.task_type}
        if action.lstrip("> ").lower().startswith("think:"):
            return THINK_ACK, 0.0, False, info
        command = self._command(action)
        if command is None:
            return NOTHING_HAPPENS, 0.0, False, {**info, "invalid_action": True}
        obs = self._engine.step(command)
        self._expert.observe(command, self._engine.world())
        won = self._engine.won
        self._success = self._success or won
        return obs, float(won), won, {**info, "won": won}

    def admissible_actions(self) -> list[str] | None:
        return self._engine.admissible if self._engine is not None and self.task_id is not None else None

    def expert_turn(self) -> tuple[str, str]:
        """(thought, action) of the scripted expert for the current state; the same answer until the next step."""
        if self._expert is None:
            raise RuntimeError("call reset() before expert_turn()")
        if self._expert_cache is None or self._expert_cache[0] != self._steps:
            self._expert_cache = (self._steps, self._expert.turn())
        return self._expert_cache[1]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._expert = None, None
        super().close()

    # --- commands -----------------------------------------------------------------------------------------
    def _command(self, action: str) -> str | None:
        """The admissible command an action means, or None. Case, spacing, a leading '>' and a final '.' are
        forgiven; "put X in/on Y" and "move X to Y" stand for each other."""
        text = " ".join(action.lower().split()).lstrip(">").strip().rstrip(".!")
        admissible = self._engine.admissible
        if text in admissible:
            return text
        m = _PUT.fullmatch(text)
        if m:
            command = self._engine.put_template.format(o=m[1], r=m[2])
            if command in admissible:
                return command
        return None

    # --- prompt -------------------------------------------------------------------------------------------
    def prompt(self, observation: str, few_shot: int = 0) -> str:
        """ReAct's ALFWorld prompt: k solved examples of this task's type (expert runs on held-out generated
        games), then the task. few_shot=0: a one-line instruction and the task."""
        if few_shot <= 0:
            put = (self._engine.put_template if self._engine else "move {o} to {r}").format(o="<object>",
                                                                                            r="<receptacle>")
            return ("Interact with a household to solve a task. Each turn, write '> think: <your reasoning>' or "
                    f"'> <action>', where an action is one of: go to <receptacle>, open <receptacle>, "
                    f"take <object> from <receptacle>, {put}, clean/heat/cool <object> with <receptacle>, "
                    "use <lamp>, examine <something>, look, inventory.\nHere is the task.\n" + observation + "\n")
        examples = react_examples(self.task_type or TASK_TYPES[0], few_shot)
        if self._engine is not None and self._engine.put_template.startswith("put"):
            examples = [_to_put_in_on(e) for e in examples]
        header = f"Interact with a household to solve a task. Here are {_NUMBER_WORDS.get(few_shot, f'{few_shot} examples')}.\n"
        return header + "\n".join(examples) + "\nHere is the task.\n" + observation + "\n"


def render_transcript(observation: str, turns: list[tuple[str, str, str]]) -> str:
    """A solved episode in the alfworld agent format: the task, then '> think: ...\\nOK.\\n> action\\nobs\\n'."""
    out = [observation.strip() + "\n"]
    for thought, action, obs in turns:
        if thought:
            out.append(f"> think: {thought}\n{THINK_ACK}\n")
        out.append(f"> {action}\n{obs}\n")
    return "".join(out)


def _to_put_in_on(text: str) -> str:
    """Rewrite an example from ALFWorld 0.4's 'move X to Y' to the 2.1.1 games' 'put X in/on Y'."""
    text = re.sub(r"^> move (.+?) to (.+)$", r"> put \1 in/on \2", text, flags=re.M)
    return re.sub(r"You move the (.+?) to the (.+?)\.", r"You put the \1 in/on the \2.", text)


def react_examples(task_type: str, k: int) -> list[str]:
    """k expert transcripts of `task_type` on held-out generated games; computed once, cached on disk."""
    path = cache_dir("alfworld") / f"react-examples-v{GENERATOR_VERSION}-{task_type}.json"
    cached = json.loads(path.read_text()) if path.exists() else []
    if len(cached) >= k:
        return cached[:k]
    examples = list(cached)
    engine = Engine()
    try:
        index = TASK_TYPES.index(task_type)
        while len(examples) < k:
            transcript = _solve(engine, generate_task(EXAMPLES_SEED, index), len(examples))
            if transcript:
                examples.append(transcript)
            index += len(TASK_TYPES)
    finally:
        engine.close()
    tmp = path.with_suffix(f".tmp{stable_hash(random.random())}")
    tmp.write_text(json.dumps(examples, indent=1))
    tmp.replace(path)
    return examples[:k]


def _solve(engine: Engine, task, salt: int, max_steps: int = 30) -> str | None:
    root = cache_dir("alfworld") / f"generated-v{GENERATOR_VERSION}-examples"
    game_file = write_trial(task, root)
    obs = engine.start(str(game_file))
    traj = read_traj_data(game_file.parent)
    expert = Expert(task.task_type, traj["pddl_params"], random.Random(stable_hash(EXAMPLES_SEED, salt)), engine)
    turns = []
    for _ in range(max_steps):
        thought, action = expert.turn()
        step_obs = engine.step(action)
        expert.observe(action, engine.world())
        turns.append((thought, action, step_obs))
        if engine.won:
            return render_transcript(obs, turns)
    return None
