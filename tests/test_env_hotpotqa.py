"""HotPotQA-ReAct environment: generated world, real HotpotQA records, expert, actions, metrics, gymnasium API."""
from __future__ import annotations

import gc
import json
import random
import re
import string
import warnings
import weakref
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import raysad_envs
from raysad_envs.hotpotqa import (EXAMPLES, INSTRUCTION, HotPotQAEnv, em_f1, exact_match_score, f1_score,
                                  list_tasks, normalize_answer)
from raysad_envs.hotpotqa.corpus import Corpus, index_dir, load_or_build_index
from raysad_envs.hotpotqa.generate import generate

FIXTURES = Path(__file__).parent / "fixtures" / "hotpotqa"


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    """Index caches go to a temporary RAYSAD_CACHE, not the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("raysad_cache")
        mp.setenv("RAYSAD_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def env(cache_root):
    """One generated-world env for the module: it keeps the shared dataset alive for the other envs."""
    env = HotPotQAEnv(split="test", seed=0)
    yield env
    env.close()


def run_expert(env, task_id):
    """Play the expert to the end; returns (turns as (thought, action, obs), last info)."""
    obs, info = env.reset(options={"task_id": task_id})
    turns = []
    while True:
        thought, action = env.expert_turn()
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        turns.append((thought, action, obs))
        if terminated or truncated:
            return turns, info


# --- registry, splits, generation ------------------------------------------------------------------------------

def test_registered_and_made_by_name(env):
    made = raysad_envs.make("hotpotqa", split="test")
    assert isinstance(made.unwrapped, HotPotQAEnv)
    assert gym.make("raysad/HotPotQA-v0", split="valid").unwrapped.split == "valid"
    assert (env.env_name, env.agent_format, env.default_max_steps, env.max_steps) == ("hotpotqa", "hotpotqa", 7, 7)
    assert raysad_envs.list_tasks("hotpotqa", "test") == env.task_ids()


def test_splits_disjoint_deterministic_and_seeded(env):
    splits = {s: list_tasks(s) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [2400, 300, 300]  # 3000 generated, 80/10/10
    assert len(set().union(*map(set, splits.values()))) == 3000
    assert list_tasks("test") == splits["test"]
    assert set(list_tasks("test", seed=1)).isdisjoint(splits["test"])  # other seed: other world, other ids
    with pytest.raises(ValueError, match="split"):
        list_tasks("dev")


def test_generation_is_deterministic_and_consistent():
    pages_a, tasks_a = generate(3, 300)
    pages_b, tasks_b = generate(3, 300)
    assert [(t.question, t.answer) for t in tasks_a] == [(t.question, t.answer) for t in tasks_b]
    assert [(p.title, p.paragraphs) for p in pages_a] == [(p.title, p.paragraphs) for p in pages_b]
    assert [t.question for t in generate(4, 300)[1]] != [t.question for t in tasks_a]
    assert len({t.question for t in tasks_a}) == 300
    by_title = {p.title: p for p in pages_a}
    assert len(by_title) == len(pages_a)
    for task in tasks_a:
        for hop in task.hops:
            page = by_title[hop.title]
            # every needed fact is readable: shown by Search, or the first Lookup hit of its keyword
            assert hop.evidence in page.first_paragraph() or page.lookup(hop.keyword)[0] == hop.evidence
        if task.kind == "bridge":
            assert task.answer in task.hops[-1].evidence  # the answer is stated by the last fact read
            assert task.hops[1].title in task.hops[0].evidence  # the bridge entity is named by the first fact
        else:
            assert task.answer in ("yes", "no") or task.answer in [h.title for h in task.hops]


def test_generated_questions_mix_bridge_and_comparison(env):
    tasks = env.dataset.tasks.values()
    kinds = [t.kind for t in tasks]
    assert 0.45 < kinds.count("bridge") / len(kinds) < 0.75
    yes_no = [t.answer for t in tasks if t.answer in ("yes", "no")]
    assert yes_no.count("yes") > 0.3 * len(yes_no) and yes_no.count("no") > 0.3 * len(yes_no)


# --- expert ----------------------------------------------------------------------------------------------------

def test_expert_solves_generated_tasks_with_grounded_varied_thoughts(env):
    ids = env.task_ids()[:50]
    results = [run_expert(env, tid) for tid in ids]
    successes = sum(info["success"] for _, info in results)
    assert successes >= 0.95 * len(ids)
    first_thoughts = set()
    for (turns, info), tid in zip(results, ids):
        task = env.dataset.tasks[tid]
        assert info["em"] == 1.0 and info["answer"] == task.answer
        assert 2 <= len(turns) <= env.max_steps
        assert all(thought.strip() for thought, _, _ in turns)  # a thought every turn
        first_thoughts.add(re.sub(r"\b[A-Z][\w-]*\b", "X", turns[0][0]))
        if task.kind == "bridge":
            # the thought that moves to the bridge entity names it, and an earlier observation showed it
            i = next(i for i, (_, action, _) in enumerate(turns) if action == f"Search[{task.hops[1].title}]")
            assert task.hops[1].title in turns[i][0]
            assert any(task.hops[1].title in obs for _, _, obs in turns[:i])
        assert task.answer in turns[-1][0] or task.answer.lower() in turns[-1][0]  # the final thought concludes
    assert len(first_thoughts) >= 3  # several templates, chosen by a seeded RNG


def test_expert_recovers_after_bad_actions(env):
    tid = env.task_ids()[7]
    env.reset(options={"task_id": tid})
    env.step("Search[nothing like this exists]")
    env.step("dance")
    for _ in range(5):
        thought, action = env.expert_turn()
        assert thought
        *_, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    assert info["success"]


def test_wrong_answers_fail(env):
    tid = env.task_ids()[0]
    task = env.dataset.tasks[tid]
    env.reset(options={"task_id": tid})
    obs, reward, terminated, truncated, info = env.step("Finish[certainly not the answer]")
    assert (reward, terminated, info["success"], info["em"]) == (0.0, True, False, 0.0)
    assert info["answer"] == task.answer and obs == "Episode finished, reward = 0"
    # a plausible but wrong sequence: read the first fact, answer with the first hop's page title
    comparison = next(t for t in env.dataset.tasks.values() if t.id in set(env.task_ids()) and t.kind == "comparison"
                      and t.answer not in ("yes", "no"))
    loser = next(h.title for h in comparison.hops if h.title != comparison.answer)
    env.reset(options={"task_id": comparison.id})
    env.step(f"Search[{comparison.hops[0].title}]")
    obs, reward, terminated, _, info = env.step(f"Finish[{loser}]")
    assert terminated and reward == 0.0 and not info["success"] and info["f1"] < 1.0


def test_max_steps_truncates_without_reward():
    env = HotPotQAEnv(split="test", max_steps=2)
    env.reset(seed=0)
    *_, terminated, truncated, info = env.step("Search[anything]")
    assert not truncated
    obs, reward, terminated, truncated, info = env.step("Lookup[anything]")
    assert truncated and not terminated and reward == 0.0 and info["em"] == 0.0 and not info["success"]


# --- actions ---------------------------------------------------------------------------------------------------

def test_invalid_actions_never_raise(env):
    rng = random.Random(0)
    junk = ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 80))) for _ in range(30)]
    actions = junk + ["", "   ", "x" * 5000, "Search[]", "Lookup[ ]", "Finish[]", "search[", "Search", "Think[hmm]",
                      "Search[[nested]] extra", "Finish [x]", "Search[Zo\u00eb \u2603]", "\x00\x01",
                      "Search[" + "y" * 5000 + "]"]
    env.reset(seed=1)
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs) and not terminated and reward == 0.0
        if info["invalid_action"]:
            assert obs.startswith("Invalid action: ")
        if truncated:
            env.reset(seed=1)
    for action in ["", "Search[]", "Lookup[]", "Finish[]", "hello", "Think[x]"]:
        env.reset(seed=1)
        obs, *_, info = env.step(action)
        assert info["invalid_action"] and obs.startswith("Invalid action: ")


def test_search_and_lookup_semantics(env):
    task = next(t for t in env.dataset.tasks.values() if t.kind == "bridge")
    corpus = env.dataset.corpus
    page = corpus.by_title[task.hops[0].title]
    env.reset(options={"task_id": env.task_ids()[0]})
    obs, *_ = env.step(f"search[{page.title.upper()}]")  # action names and titles are case-insensitive
    assert obs == page.first_paragraph() and len(page.paragraphs[0][:5]) >= 1
    hits = page.lookup(task.hops[0].keyword)
    for i, sentence in enumerate(hits, 1):
        obs, *_ = env.step(f"LOOKUP[{task.hops[0].keyword}]")
        assert obs == f"(Result {i} / {len(hits)}) {sentence}"
    assert env.step(f"Lookup[{task.hops[0].keyword}]")[0] == "No more results."
    # an inexact entity is not found; similar titles are offered (bm25), and the old page stays for Lookup
    partial = page.title.split()[-1] + " film page"
    obs, *_ = env.step(f"Search[{partial}]")
    assert obs.startswith(f"Could not find [{partial}]. Similar: [")
    similar = eval(obs[obs.index("Similar: ") + 9:-1])  # the Python list ReAct's wikienv prints
    assert 1 <= len(similar) <= 5 and all(t in corpus.by_title for t in similar)
    assert any(page.title.split()[-1] in t for t in similar)
    assert env.step(f"Lookup[{task.hops[0].keyword}]")[0] == "No more results."  # same keyword: still used up
    obs, *_ = env.step("Lookup[ IS ]")  # a new keyword starts over, on the old page (every intro has " is ")
    assert obs.startswith("(Result 1 / ") and obs.endswith(page.sentences[0])


def test_reset_with_same_seed_or_task_gives_same_episode(env):
    other = HotPotQAEnv(split="test", seed=0)
    a, info_a = env.reset(seed=123)
    b, info_b = other.reset(seed=123)
    assert (a, info_a["task_id"]) == (b, info_b["task_id"])
    assert {env.reset(seed=s)[1]["task_id"] for s in (124, 125, 126)} != {info_a["task_id"]}  # seeds pick tasks
    first = run_expert(env, info_a["task_id"])
    second = run_expert(other, info_a["task_id"])
    assert first == second


def test_gymnasium_env_checker(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(HotPotQAEnv(split="test").unwrapped)
        check_env(gym.make("raysad/HotPotQA-v0", split="valid").unwrapped)
        check_env(gym.make("raysad/HotPotQA-v0", split="valid", render_mode="ansi"))


# --- prompt ----------------------------------------------------------------------------------------------------

def test_prompt_instruction_examples_and_question(env):
    question, _ = env.reset(seed=0)
    bare = env.prompt(question)
    assert bare.startswith("Solve a question answering task with interleaving Thought, Action, Observation steps.")
    assert "(1) Search[entity]" in bare and "(2) Lookup[keyword]" in bare and "(3) Finish[answer]" in bare
    assert bare.endswith(f"Question: {question}\n") and "Here are some examples." not in bare
    assert env.prompt("Question: " + question) == bare
    two = env.prompt(question, few_shot=2)
    assert two.startswith(INSTRUCTION + "Here are some examples.\n") and EXAMPLES[1] in two and EXAMPLES[2] not in two
    with pytest.raises(ValueError):
        env.prompt(question, few_shot=len(EXAMPLES) + 1)
    for example in EXAMPLES:  # the hotpotqa agent format, numbered from 1, ending in Finish
        lines = example.strip("\n").split("\n")
        assert lines[0].startswith("Question: ") and (len(lines) - 1) % 3 == 0
        for i in range(1, (len(lines) - 1) // 3 + 1):
            thought, action, observation = lines[3 * i - 2: 3 * i + 1]
            assert thought.startswith(f"Thought {i}: ") and observation.startswith(f"Observation {i}: ")
            assert re.fullmatch(rf"Action {i}: (Search|Lookup|Finish)\[.+\]", action)
        assert "Action" in lines[-2] and "Finish[" in lines[-2]


def test_examples_are_true_episodes_of_the_environment():
    """Replaying each example's actions in its world (seed 2024) gives back its observations."""
    world = HotPotQAEnv(split="train", seed=2024)
    by_question = {t.question: t.id for t in world.dataset.tasks.values()}
    for example in EXAMPLES:
        lines = example.strip("\n").split("\n")
        world.reset(options={"task_id": by_question[lines[0][len("Question: "):]]})
        for i in range(1, (len(lines) - 1) // 3 + 1):
            action = lines[3 * i - 1].split(": ", 1)[1]
            obs, *_ = world.step(action)
            assert f"Observation {i}: {obs}" == lines[3 * i]
    world.close()


# --- metrics (worked examples) ---------------------------------------------------------------------------------

def test_normalize_answer():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"  # lower, punctuation, article, spaces
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("U.S.A.") == "usa"  # punctuation is deleted, not replaced by a space
    assert normalize_answer("theory of the atom") == "theory of atom"  # "the" only as a whole word


def test_exact_match():
    assert exact_match_score("the Beatles", "Beatles")
    assert exact_match_score("Bath,  Maine", "bath maine")
    assert not exact_match_score("Bath", "Bath, Maine")
    assert em_f1("1931", "1931") == (1.0, 1.0)


def test_f1_worked_examples():
    # "barack obama" vs "obama": common 1; P = 1/2, R = 1/1; F1 = 2 * 1/2 * 1 / (3/2) = 2/3
    assert f1_score("Barack Obama", "Obama") == pytest.approx((2 / 3, 1 / 2, 1.0))
    # "in red house" vs "red big house": common {red, house} = 2; P = R = 2/3; F1 = 2/3
    assert f1_score("in the red house", "a red big house") == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # "cat cat" vs "cat": the multiset intersection counts "cat" once; P = 1/2, R = 1; F1 = 2/3
    assert f1_score("the the cat cat", "cat")[0] == pytest.approx(2 / 3)
    # nothing in common -> 0
    assert f1_score("Paris", "London") == (0.0, 0.0, 0.0)
    # official special cases: yes/no/noanswer on either side must match exactly
    assert f1_score("yes", "yes sir") == (0.0, 0.0, 0.0)   # prediction is "yes", gold is not
    assert f1_score("yes it is", "yes") == (0.0, 0.0, 0.0)  # gold is "yes", prediction is not
    assert f1_score("noanswer", "no") == (0.0, 0.0, 0.0)
    assert f1_score("No.", "no") == (1.0, 1.0, 1.0)
    # "new york city" vs "york": P = 1/3, R = 1; F1 = 2 * 1/3 / (4/3) = 1/2
    assert em_f1("New York City", "York") == pytest.approx((0.0, 0.5))


# --- real HotpotQA data ----------------------------------------------------------------------------------------

def test_real_fixture_records_load_split_and_are_solved():
    ids = {s: list_tasks(s, data=FIXTURES) for s in ("train", "valid", "test")}
    assert sum(map(len, ids.values())) == 10
    assert len(set().union(*map(set, ids.values()))) == 10
    assert ids == {s: list_tasks(s, data=str(FIXTURES)) for s in ids}
    for split in ("train", "valid", "test"):
        env = HotPotQAEnv(split=split, data=FIXTURES)
        assert len(env.dataset.corpus) == 100  # 10 records x 10 context paragraphs, titles all distinct here
        for tid in env.task_ids():
            turns, info = run_expert(env, tid)
            assert info["success"] and info["em"] == 1.0, (tid, turns)
        env.close()


def test_real_non_ascii_answer_is_matched_in_the_env_charset():
    env = HotPotQAEnv(split="train", data={"train": FIXTURES / "dev_distractor_sample5.json"})
    tid = "5a7613c15542994ccc9186bf"  # answer "Gesellschaft mit beschraenkter Haftung" with an umlaut
    turns, info = run_expert(env, tid)
    assert turns[-1][1] == "Finish[Gesellschaft mit beschrankter Haftung]"
    assert info["success"] and info["answer"] == "Gesellschaft mit beschr\u00e4nkter Haftung"


def test_real_files_per_split():
    train, dev = FIXTURES / "train_sample5.json", FIXTURES / "dev_distractor_sample5.json"
    train_ids = [r["_id"] for r in json.loads(train.read_text())]
    dev_ids = [r["_id"] for r in json.loads(dev.read_text())]
    assert list_tasks("train", data={"train": train, "test": dev}) == train_ids
    assert list_tasks("test", data={"train": train, "test": dev}) == dev_ids
    assert list_tasks("valid", data={"train": train, "test": dev}) == []
    assert list_tasks("valid", data=f"train={train},dev={dev}") == dev_ids
    assert list_tasks("train", data=FIXTURES, num_tasks=4) + list_tasks("valid", data=FIXTURES, num_tasks=4) + \
        list_tasks("test", data=FIXTURES, num_tasks=4) != []


def small_record(answer="1874"):
    """A handmade record whose second supporting sentence lies past the first 5 (so it needs a Lookup)."""
    harbour = [f"Sentence {i} about the old harbour of Quillon." for i in range(6)] + \
              ["The lighthouse of Quillon was designed by Ada Merrow."]
    return {"_id": "small-1", "answer": answer, "question": "When was the designer of the lighthouse of Quillon born?",
            "supporting_facts": [["Quillon", 6], ["Ada Merrow", 1]],
            "context": [["Quillon", harbour],
                        ["Ada Merrow", ["Ada Merrow was an engineer.", " She was born in 1874 in Dunmore."]],
                        ["Dunmore", ["Dunmore is a town."]]],
            "type": "bridge", "level": "hard"}


def test_small_written_file_needs_lookup_and_user_corpus(tmp_path):
    data = tmp_path / "mine.json"
    data.write_text(json.dumps([small_record()]))
    abstracts = tmp_path / "abstracts.jsonl"
    abstracts.write_text(json.dumps({"title": "Lighthouse", "text": "A lighthouse is a tower. It guides ships."}) + "\n"
                         + json.dumps({"title": "Quillon", "text": ["A different Quillon page."]}) + "\n")
    env = HotPotQAEnv(split="train", data={"train": data}, corpus=abstracts)
    turns, info = run_expert(env, "small-1")
    actions = [a for _, a, _ in turns]
    assert actions[:2] == ["Search[Quillon]", "Lookup[lighthouse]"] and info["success"]
    assert "(Result 1 / 1) The lighthouse of Quillon was designed by Ada Merrow." in turns[1][2]
    env.reset(options={"task_id": "small-1"})
    assert env.step("Search[lighthouse]")[0] == "A lighthouse is a tower. It guides ships."  # the user's page
    assert env.step("Search[Quillon]")[0].startswith("Sentence 0")  # HotpotQA's context page wins on a clash
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps(small_record()) + "\n")
    assert list_tasks("test", data={"test": jsonl}) == ["small-1"]


# --- the expert only names what it has seen -------------------------------------------------------------------

_QUALIFIER = re.compile(r"\s*\([^()]*\)\s*$")


def _says(text, name):
    """`name` occurs in `text` as whole words (case and spacing ignored)."""
    text, name = " ".join(text.lower().split()), " ".join(name.lower().split())
    return bool(name) and re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", text) is not None


def page_names(corpus):
    """The entities an episode can name: every page title, and each title without its "(...)" qualifier."""
    names = set(corpus.by_title)
    names |= {base for base in (_QUALIFIER.sub("", t) for t in corpus.by_title) if len(base) > 2}
    return names


def unseen_names(question, turns, names, answer):
    """[(turn, where, what)] for every use of something the episode had not shown yet, i.e. that is neither in
    the question nor in an earlier observation:
      * a page name (title, or title without its qualifier) in a thought or in a Search argument;
      * a word of a Search argument;
      * a Lookup keyword, unless it is a plain lower-case word that is not part of the answer ("born");
      * a Finish answer other than yes/no/unknown (compared as HotpotQA normalises answers)."""
    problems, shown = [], question
    answer_words = normalize_answer(answer).split()
    for i, (thought, action, obs) in enumerate(turns):
        match = re.fullmatch(r"(\w+)\[(.*)\]", action.strip(), re.DOTALL)
        kind, arg = (match[1].lower(), match[2]) if match else ("", "")
        for where, text in [("thought", thought)] + ([("search", arg)] if kind == "search" else []):
            lowered = text.lower()
            problems += [(i, where, name) for name in names
                         if name.lower() in lowered and _says(text, name) and not _says(shown, name)]
        if kind == "search":
            problems += [(i, "search word", w) for w in re.findall(r"[A-Za-z0-9]+", arg) if not _says(shown, w)]
        if kind == "lookup" and not _says(shown, arg) and not (arg.isalpha() and arg.islower()
                                                                and arg not in answer_words):
            problems.append((i, "lookup", arg))
        if kind == "finish" and arg.lower() not in ("yes", "no", "unknown") \
                and f" {normalize_answer(arg)} " not in f" {normalize_answer(shown)} ":
            problems.append((i, "answer", arg))
        shown += "\n" + obs
    return problems


def replay(env, task_id, turns):
    """Play given (thought, action) pairs; returns them as (thought, action, observation)."""
    env.reset(options={"task_id": task_id})
    return [(thought, action, env.step(action)[0]) for thought, action in turns]


def play_expert(env, task_id):
    """run_expert, also returning the kind of each of the expert's moves."""
    env.reset(options={"task_id": task_id})
    turns, moves = [], []
    while True:
        thought, action = env.expert_turn()
        assert env.expert_turn() == (thought, action)  # the same turn until the next step
        moves.append(env.expert_move)
        obs, reward, terminated, truncated, info = env.step(action)
        turns.append((thought, action, obs))
        if terminated or truncated:
            return turns, moves, info


def test_unseen_names_checker_catches_the_old_leak():
    """The expert before this rule, on two fixture bridge questions (its turns copied here): it named the
    second-hop page in its first thought, and searched it under a title no observation had shown. The checker
    must say so."""
    train = HotPotQAEnv(split="train", data={"train": FIXTURES / "train_sample5.json"})
    names = page_names(train.dataset.corpus)
    donati = "5ab4435b5542990594ba9bdf"  # What is the genre of the film for which Danilo Donati fist won ...
    old = replay(train, donati, [
        ("I need to search Danilo Donati and Romeo and Juliet (1968 film), and find the facts the question asks "
         "about.", "Search[Danilo Donati]"),
        ("The observation says he won the Academy Award for Costume Design twice. Now I need to find the fact I "
         "need, so I will search Romeo and Juliet (1968 film).", "Search[Romeo and Juliet (1968 film)]"),
        ("From these facts, the answer is romance.", "Finish[romance]")])
    task = train.dataset.tasks[donati]
    problems = unseen_names(task.question, old, names, task.answer)
    assert (0, "thought", "Romeo and Juliet (1968 film)") in problems
    assert (1, "search", "Romeo and Juliet (1968 film)") in problems  # "Romeo and Juliet" was shown, this not
    assert all(turn < 2 for turn, *_ in problems)  # "romance" was shown by then: the answer itself is fine

    boldrini = "5ac17a975542994ab5c67d63"  # Who founded the knighthood order that Laura Boldrini belongs to?
    order = "Order of Merit of the Italian Republic"
    old = replay(train, boldrini, [
        (f"I need to search Laura Boldrini and {order}, and find the facts the question asks about.",
         "Search[Laura Boldrini]"),
        (f"Laura Boldrini is an Italian journalist and politician. Next, I need to search {order} to find the "
         "fact I need.", f"Search[{order}]"),
        ("From these facts, the answer is Luigi Einaudi.", "Finish[Luigi Einaudi]")])
    task = train.dataset.tasks[boldrini]
    problems = unseen_names(task.question, old, names, task.answer)
    assert {(0, "thought", order), (1, "thought", order), (1, "search", order)} <= set(problems)
    # guessing the answer, or looking up a name before seeing it, is caught too
    guess = replay(train, boldrini, [("The founder must be Luigi Einaudi.", "Finish[Luigi Einaudi]")])
    assert unseen_names(task.question, guess, set(), task.answer) == [(0, "answer", "Luigi Einaudi")]
    peek = replay(train, boldrini, [("Let me search her.", "Search[Laura Boldrini]"),
                                  ("Who founded it?", "Lookup[Einaudi]"), ("Or him?", "Search[Einaudi knighthood]")])
    assert unseen_names(task.question, peek, set(), task.answer) == [(1, "lookup", "Einaudi"),
                                                                     (2, "search word", "Einaudi")]


def test_expert_names_only_what_it_has_seen_on_real_fixtures():
    """Every fixture question (5 train + 5 dev-distractor records): no turn names a page, searches a word, looks
    up a name or answers with something the episode has not shown, and every question is still solved."""
    for path in (FIXTURES / "train_sample5.json", FIXTURES / "dev_distractor_sample5.json"):
        env = HotPotQAEnv(split="train", data={"train": path})
        names = page_names(env.dataset.corpus)
        bridge_first = []
        for tid in env.task_ids():
            task = env.dataset.tasks[tid]
            turns, moves, info = play_expert(env, tid)
            assert unseen_names(task.question, turns, names, task.answer) == [], (tid, turns)
            assert info["success"] and "give_up" not in moves, (tid, turns)
            if task.kind == "bridge":
                second = task.hops[-1].title
                bridge_first.append(turns[0])
                # the checker would have caught the second-hop page in the first thought
                if not _says(task.question, second):
                    leaky = [(f"{turns[0][0]} Then I will search {second}.",) + turns[0][1:]] + turns[1:]
                    assert (0, "thought", second) in unseen_names(task.question, leaky, names, task.answer)
        assert bridge_first  # each file has bridge questions
        env.close()


def test_expert_names_only_what_it_has_seen_on_generated_tasks(env):
    """All 300 generated test questions: nothing unseen is named, and the expert solves every one."""
    names = page_names(env.dataset.corpus)
    solved, bridges = 0, 0
    for tid in env.task_ids():
        task = env.dataset.tasks[tid]
        turns, moves, info = play_expert(env, tid)
        assert unseen_names(task.question, turns, names, task.answer) == [], (tid, turns)
        solved += info["success"]
        if task.kind == "bridge":
            bridges += 1
            person = task.hops[1].title
            first_seen = next(i for i, (_, _, obs) in enumerate(turns) if person in obs)
            assert not any(person in thought or person in action for thought, action, _ in turns[:first_seen + 1])
    assert bridges > 100 and solved == len(env.task_ids())


def _bridge_record(quillon, merrow, facts, question="When was the designer of the lighthouse of Quillon born?",
                   answer="1874"):
    return {"_id": "hidden-1", "answer": answer, "question": question, "supporting_facts": facts,
            "context": [["Quillon", quillon], ["Ada Merrow", merrow], ["Dunmore", ["Dunmore is a town."]]],
            "type": "bridge", "level": "hard"}


@pytest.mark.parametrize("case", ["lookup_name", "query", "give_up"])
def test_expert_finds_an_unnamed_bridge_page_honestly_or_gives_up(tmp_path, case):
    """The first supporting fact does not name the bridge entity (Ada Merrow). The expert may not search her
    until an observation shows her name: it looks up a question word on the page (lookup_name), or searches
    words of the question and picks her from the similar pages (query); when neither shows her, it gives up."""
    if case == "lookup_name":  # a later, non-supporting sentence of the first page names her
        quillon = ["Quillon is a port town."] + [f"Quillon has old street number {i}." for i in range(5)] + \
                  ["The lighthouse of Quillon was designed by Ada Merrow."]
        record = _bridge_record(quillon, ["Ada Merrow was an engineer.", "She was born in 1874 in Dunmore."],
                                [["Quillon", 0], ["Ada Merrow", 1]])
    elif case == "query":  # only her own page links her to the lighthouse
        record = _bridge_record(["Quillon is a port town.", "Its lighthouse is famous."],
                                ["Ada Merrow was an engineer.", "She designed the lighthouse of Quillon.",
                                 "She was born in 1874 in Dunmore."], [["Quillon", 1], ["Ada Merrow", 2]])
    else:  # nothing shown ever leads to her
        record = _bridge_record(["Quillon is a port town.", "Its lighthouse is famous."],
                                ["Ada Merrow was an engineer.", "Her work stands on the coast."],
                                [["Quillon", 1], ["Ada Merrow", 0]], question="Who designed the lighthouse of "
                                                                             "Quillon?", answer="Ada Merrow")
    data = tmp_path / "hidden.json"
    data.write_text(json.dumps([record]))
    env = HotPotQAEnv(split="train", data={"train": data})
    task = env.dataset.tasks["hidden-1"]
    turns, moves, info = play_expert(env, "hidden-1")
    assert unseen_names(task.question, turns, page_names(env.dataset.corpus), task.answer) == [], turns
    assert turns[0][1] == "Search[Quillon]" and "Ada Merrow" not in turns[0][0]
    if case == "give_up":
        assert moves[-1] == "give_up" and turns[-1][1] == "Finish[unknown]" and not info["success"]
        assert not any("Ada Merrow" in thought + action for thought, action, _ in turns)
    else:
        assert case in moves and info["success"], turns
        searched = next(i for i, (_, action, _) in enumerate(turns) if action == "Search[Ada Merrow]")
        assert moves[searched - 1] == case and "Ada Merrow" in turns[searched - 1][2]  # shown just before


def test_bad_real_data_errors_name_file_record_and_field(tmp_path):
    record = small_record()
    del record["question"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([small_record(), record]))
    with pytest.raises(ValueError, match=r"bad\.json record 1: field 'question'"):
        HotPotQAEnv(data=bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"_id": "x",\n "question": }]')
    with pytest.raises(ValueError, match=r"broken\.json:2: not valid JSON"):
        list_tasks("train", data=broken)
    bad_corpus = tmp_path / "corpus.jsonl"
    bad_corpus.write_text('{"title": "A", "text": "ok"}\n{"title": "", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: field 'title'"):
        list_tasks("train", data=bad, corpus=bad_corpus)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HotPotQAEnv(data=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown split"):
        HotPotQAEnv(data={"training": bad})


# --- caching and close -----------------------------------------------------------------------------------------

def test_index_is_cached_on_disk(tmp_path, monkeypatch):
    import bm25s

    data = tmp_path / "cache.json"
    data.write_text(json.dumps([small_record()]))
    env = HotPotQAEnv(split="train", data={"train": data})
    env.reset(options={"task_id": "small-1"})
    first = env.step("Search[engineer town]")[0]
    assert "'Ada Merrow'" in first and (index_dir(env.dataset.corpus) / "params.index.json").exists()
    fresh = Corpus(env.dataset.corpus.pages)
    monkeypatch.setattr(bm25s.BM25, "index", lambda *a, **k: pytest.fail("the index was rebuilt, not loaded"))
    assert fresh.similar("engineer town") == env.dataset.corpus.similar("engineer town")
    assert load_or_build_index(fresh) is not None


def test_close_releases_dataset_and_index(tmp_path):
    data = tmp_path / "close.json"
    data.write_text(json.dumps([small_record(answer="1874 AD")]))
    env = HotPotQAEnv(split="train", data={"train": data})
    env.reset(options={"task_id": "small-1"})
    env.step("Search[harbour engineer]")  # builds the bm25 index
    dataset, index = weakref.ref(env.dataset), weakref.ref(env.dataset.corpus.index)
    env.close()
    gc.collect()
    assert dataset() is None and index() is None
    assert env.reset(options={"task_id": "small-1"})[0].startswith("When was")  # usable again: reloads
