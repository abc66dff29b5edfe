"""HotPotQA-ReAct: answer a multi-hop question with Search[entity], Lookup[keyword] and Finish[answer] over a
local corpus (ReAct's wikienv, offline). Reward = exact match of the Finish answer (HotpotQA's official EM).

Actions (names case-insensitive; anything else, or empty brackets, is an invalid action that costs a step):
  Search[entity]   the page's first paragraph (<= 5 sentences), or "Could not find [entity]. Similar: [...]."
  Lookup[keyword]  "(Result i / n) <sentence>": the next sentence of the current page containing keyword
  Finish[answer]   ends the episode: "Episode finished, reward = 0|1"; info gets em, f1 and the gold answer
Answers are compared after both are mapped into the env's ASCII charset (the agent only ever sees ASCII).
The episode is truncated after `max_steps` (7, as ReAct) without a Finish; info then has em = f1 = 0.

    env = HotPotQAEnv(split="test")                      # generated world; or data="hotpot_dev_distractor_v1.json"
    question, info = env.reset(seed=0)
    thought, action = env.expert_turn()                  # "I need to search ...", "Search[...]"
    obs, reward, terminated, truncated, info = env.step(action)
"""
from __future__ import annotations

import re

from ..core import InvalidAction, TextEnv, to_text
from .data import Dataset, Task, load_dataset
from .expert import expert_turn
from .metrics import em_f1

INSTRUCTION = (
    "Solve a question answering task with interleaving Thought, Action, Observation steps. Thought can reason "
    "about the current situation, and Action can be three types:\n"
    "(1) Search[entity], which searches the exact entity on Wikipedia and returns the first paragraph if it "
    "exists. If not, it will return some similar entities to search.\n"
    "(2) Lookup[keyword], which returns the next sentence containing keyword in the current passage.\n"
    "(3) Finish[answer], which returns the answer and finishes the task.\n"
)

# Our own examples: expert episodes on train tasks of the generated world with seed 2024, in the hotpotqa agent
# format (the second starts with a failed search, to show the recovery). Static text, so prompts never drift.
EXAMPLES = [
    """Question: The director of The Painted Tower was born in which year?
Thought 1: The question needs two facts: who directed The Painted Tower, and then the birth year of the director. I will start by searching The Painted Tower.
Action 1: Search[The Painted Tower]
Observation 1: The Painted Tower is a 1989 Quilquilorian drama film. Critics praised its photography and pacing.
Thought 2: I need to know who directed it, which this paragraph does not give. Let me look up directed.
Action 2: Lookup[directed]
Observation 2: (Result 1 / 1) It was directed by Freya Draick.
Thought 3: The observation says The Painted Tower was directed by Freya Draick. Now I need to find her birth year, so I will search Freya Draick.
Action 3: Search[Freya Draick]
Observation 3: Freya Draick is a Quilquilorian film director. Her best-known films include A Ballad for Vera, Carnival of Eskberettport and The Painted Tower. She is known for a quiet, careful working style.
Thought 4: The first paragraph does not tell me her birth year. Let me look up born.
Action 4: Lookup[born]
Observation 4: (Result 1 / 1) She was born in 1955 in Rudgorhammouth, Quilquiloria.
Thought 5: So the director of The Painted Tower, Freya Draick, was born in 1955. The answer is 1955.
Action 5: Finish[1955]
Observation 5: Episode finished, reward = 1
""",
    """Question: Which was founded first, Lanor Shipping or Kenlisor Energy?
Thought 1: To compare them I should search both Lanor Shipping and Kenlisor Energy. I will start with Lanor Shipping.
Action 1: Search[Lanor Company]
Observation 1: Could not find [Lanor Company]. Similar: ['Lanor Shipping', 'Konrad Fenick', 'Marrudley Pharmaceuticals', 'Halar Airways', 'Selgilers Airways'].
Thought 2: I still need to find when Lanor Shipping was founded. Let me search Lanor Shipping.
Action 2: Search[Lanor Shipping]
Observation 2: Lanor Shipping is a Dunnarorian shipping company. It is headquartered in Rudostostholm, Dunnaroria. Its products are sold in many countries.
Thought 3: I need to know when it was founded, which this paragraph does not give. Let me look up founded.
Action 3: Lookup[founded]
Observation 3: (Result 1 / 1) The company was founded in 1969 by Konrad Fenick.
Thought 4: Lanor Shipping was founded in 1969. I need to search Kenlisor Energy and find when it was founded.
Action 4: Search[Kenlisor Energy]
Observation 4: Kenlisor Energy is a Quilquilorian energy company. The company was founded in 1988 by Elena Rudhemor. It is listed on a national stock exchange.
Thought 5: Lanor Shipping (1969) comes before Kenlisor Energy (1988). So the answer is Lanor Shipping.
Action 5: Finish[Lanor Shipping]
Observation 5: Episode finished, reward = 1
""",
    """Question: Are Alma Arick and Karin Yardoris both Quilquilorian?
Thought 1: To compare them I should search both Alma Arick and Karin Yardoris. I will start with Alma Arick.
Action 1: Search[Alma Arick]
Observation 1: Alma Arick is a Quilquilorian actress. She was born in 1939 in Gororhaven, Quilquiloria. She lives with her family near the coast.
Thought 2: So Alma Arick is Quilquilorian. Now let me search Karin Yardoris and find her nationality.
Action 2: Search[Karin Yardoris]
Observation 2: Karin Yardoris is a Dragorerian film director. She was born in 1946 in Tevport, Dragoreria. Her best-known film is Pale Parades. She lives with her family near the coast.
Thought 3: Alma Arick is Quilquilorian but Karin Yardoris is Dragorerian, so the answer is no.
Action 3: Finish[no]
Observation 3: Episode finished, reward = 1
""",
    """Question: What nationality is the founder of the band The Narard Quartet?
Thought 1: To answer this, I first need who founded The Narard Quartet, then the nationality of the founder. Let me search The Narard Quartet.
Action 1: Search[The Narard Quartet]
Observation 1: The Narard Quartet is a Gilmororian metal band. Their music mixes traditional and modern styles.
Thought 2: I need to know who founded it, which this paragraph does not give. Let me look up founded.
Action 2: Lookup[founded]
Observation 2: (Result 1 / 1) It was founded by the singer Adrian Dorino.
Thought 3: The Narard Quartet was founded by Adrian Dorino. Next, I need to search Adrian Dorino to find his nationality.
Action 3: Search[Adrian Dorino]
Observation 3: Adrian Dorino is a Gilmororian singer. He has received several national awards.
Thought 4: Adrian Dorino is Gilmororian, so the answer is Gilmororian.
Action 4: Finish[Gilmororian]
Observation 4: Episode finished, reward = 1
""",
]

_ACTION = re.compile(r"(search|lookup|finish)\[(.*)\]", re.IGNORECASE | re.DOTALL)


def _shorten(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class HotPotQAEnv(TextEnv):
    """Multi-hop QA by Search/Lookup/Finish over a local corpus; see the module docstring and data.py."""

    env_name = "hotpotqa"
    agent_format = "hotpotqa"
    default_max_steps = 7  # as ReAct's HotpotQA runs
    token_budget = (160, 32)  # expert thoughts, SmolLM2 tokens: max 41 on generated tasks, 113 on the real sample

    def __init__(self, split: str = "train", data=None, corpus=None, seed: int = 0, num_tasks: int | None = None,
                 max_steps: int | None = None, render_mode: str | None = None):
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        self.data, self.corpus_path, self.seed, self.num_tasks = data, corpus, seed, num_tasks
        self._dataset: Dataset | None = None
        self._task: Task | None = None
        self._new_episode()
        _ = self.dataset  # load now, so that bad data fails at construction with its file and field

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.data, self.corpus_path, self.seed, self.num_tasks)
            self._split_ids = set(self._dataset.splits[self.split])
        return self._dataset

    @property
    def task(self) -> Task:
        if self._task is None:
            raise RuntimeError("call reset() first")
        return self._task

    def _new_episode(self) -> None:
        self._page = None                  # the last page a Search found
        self._lookup_key, self._lookup_hits, self._lookup_next = None, [], 0
        self._seen: dict[str, str] = {}    # page title -> everything observed from it this episode
        self._exhausted: set[tuple[str, str]] = set()  # (title, keyword) whose Lookup ran out
        self._last_action: tuple[str, str] | None = None
        self._observed: list[str] = []     # every Search/Lookup observation of this episode, in order
        self._searched: set[str] = set()   # Search arguments used (lower-case, spaces collapsed)
        self._found_as: dict[str, str] = {}  # page title -> the Search argument that last found it
        self.expert_move: str | None = None  # the kind of the expert's last turn (see expert.py)

    # --- TextEnv ---------------------------------------------------------------------------------------------
    def task_ids(self) -> list[str]:
        return list(self.dataset.splits[self.split])

    def _load_task(self, task_id: str) -> tuple[str, dict]:
        dataset = self.dataset
        if task_id not in self._split_ids:
            where = "another split" if task_id in dataset.tasks else "this dataset"
            raise ValueError(f"task {task_id!r} is not in split {self.split!r} (it is in {where})")
        self._task = dataset.tasks[task_id]
        self._new_episode()
        return self._task.question, {"question": self._task.question, "type": self._task.kind}

    def _apply(self, action: str) -> tuple[str, float, bool, dict]:
        match = _ACTION.fullmatch(action)
        if not match:
            raise InvalidAction(f"{_shorten(action)!r} is not Search[entity], Lookup[keyword] or Finish[answer]")
        kind, arg = match.group(1).lower(), " ".join(match.group(2).split())
        if not arg:
            what = {"search": "an entity", "lookup": "a keyword", "finish": "an answer"}[kind]
            raise InvalidAction(f"{kind.capitalize()}[] needs {what} inside the brackets")
        self._last_action = (kind, arg.lower())
        task = self.task
        if kind == "finish":
            em, f1 = em_f1(to_text(arg), to_text(task.answer))
            self._success = em == 1.0
            return f"Episode finished, reward = {int(em)}", em, True, {"em": em, "f1": f1, "answer": task.answer}
        obs = self._search(arg) if kind == "search" else self._lookup(arg)
        self._observed.append(obs)
        info = {}
        if self._steps >= self.max_steps:  # truncated without an answer: it scores 0
            info = {"em": 0.0, "f1": 0.0, "answer": task.answer}
        return obs, 0.0, False, info

    def _search(self, entity: str) -> str:
        corpus = self.dataset.corpus
        self._searched.add(entity.lower())
        page = corpus.find(entity)
        if page is None:  # like ReAct: the previous page stays current for Lookup
            return f"Could not find [{_shorten(entity, 200)}]. Similar: {corpus.similar(entity)}."
        self._page = page
        self._found_as[page.title] = entity
        self._lookup_key, self._lookup_hits, self._lookup_next = None, [], 0
        obs = page.first_paragraph()
        self._seen[page.title] = self._seen.get(page.title, "") + "\n" + obs
        return obs

    def _lookup(self, keyword: str) -> str:
        if self._page is None:
            return "There is no page to look in yet; use Search[entity] first."
        if keyword.lower() != self._lookup_key:
            self._lookup_key, self._lookup_hits, self._lookup_next = keyword.lower(), self._page.lookup(keyword), 0
        if self._lookup_next >= len(self._lookup_hits):
            self._exhausted.add((self._page.title, keyword.lower()))
            return "No more results."
        sentence = self._lookup_hits[self._lookup_next]
        self._lookup_next += 1
        self._seen[self._page.title] = self._seen.get(self._page.title, "") + "\n" + sentence
        return f"(Result {self._lookup_next} / {len(self._lookup_hits)}) {sentence}"

    def close(self) -> None:
        """Drop the dataset, corpus and index references (shared copies are freed with the last env)."""
        self._dataset, self._task, self.task_id = None, None, None
        self._new_episode()
        super().close()

    # --- expert ----------------------------------------------------------------------------------------------
    def expert_turn(self) -> tuple[str, str]:
        """The scripted expert's (thought, action): it plans from the true question structure but names only
        what the question or an earlier observation has shown (the rule and its fallbacks: expert.py)."""
        return expert_turn(self)

    # --- prompt ----------------------------------------------------------------------------------------------
    def prompt(self, observation: str, few_shot: int = 0) -> str:
        """ReAct's HotpotQA instruction, `few_shot` of our examples, then "Question: ...\\n"."""
        if not 0 <= few_shot <= len(EXAMPLES):
            raise ValueError(f"few_shot must be between 0 and {len(EXAMPLES)}, got {few_shot}")
        question = observation.strip()
        question = question[len("Question:"):].strip() if question.startswith("Question:") else question
        examples = "Here are some examples.\n" + "\n".join(EXAMPLES[:few_shot]) + "\n" if few_shot else ""
        return f"{INSTRUCTION}{examples}Question: {question}\n"
