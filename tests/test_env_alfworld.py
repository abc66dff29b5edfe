"""ALFWorld environment: generated games on ALFWorld's real engine, the scripted expert, real-data loading."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import string
import threading
from pathlib import Path

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import raysad_envs
from raysad_envs.alfworld import ALFWorldEnv, list_tasks
from raysad_envs.alfworld.generator import TASK_TYPES, generate_task
from raysad_envs.core import CHARSET

FIXTURES = Path(__file__).parent / "fixtures" / "alfworld"
POOL = 60  # small generated pools keep listing instant; games are compiled only when played


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYSAD_CACHE", str(tmp_path_factory.mktemp("raysad-cache")))
        yield


def one_task_per_type(split="train", seed=0, num_tasks=POOL) -> dict[str, str]:
    first = {}
    for task_id in list_tasks(split, seed=seed, num_tasks=num_tasks):
        first.setdefault(task_id.split("-", 1)[0], task_id)
    return first


def run_expert(env, task_id, seed=0):
    obs, info = env.reset(seed=seed, options={"task_id": task_id})
    turns = []
    terminated = truncated = False
    while not (terminated or truncated):
        thought, action = env.expert_turn()
        obs, reward, terminated, truncated, info = env.step(action)
        turns.append((thought, action, obs, reward))
    return turns, info


# --- tasks and splits -----------------------------------------------------------------------------------
def test_generated_splits_are_disjoint_and_deterministic():
    splits = {s: list_tasks(s, seed=0, num_tasks=POOL) for s in ("train", "valid", "test")}
    all_ids = [t for ids in splits.values() for t in ids]
    assert len(all_ids) == len(set(all_ids)) == POOL
    assert splits["test"] == list_tasks("test", seed=0, num_tasks=POOL)
    assert splits["test"] == raysad_envs.list_tasks("alfworld", "test", seed=0, num_tasks=POOL)
    assert set(list_tasks("test", seed=1, num_tasks=POOL)) != set(splits["test"])
    # a bigger pool keeps the tasks of a smaller one (task i depends only on seed and i)
    bigger = {t for s in ("train", "valid", "test") for t in list_tasks(s, seed=0, num_tasks=2 * POOL)}
    assert set(all_ids) <= bigger


def test_generator_covers_all_types_and_rooms_with_alfred_names():
    tasks = [generate_task(0, i) for i in range(POOL)]
    assert {t.task_type for t in tasks} == set(TASK_TYPES)
    assert {t.room for t in tasks} == {"Kitchen", "LivingRoom", "Bedroom", "Bathroom"}
    assert generate_task(0, 7).problem == tasks[7].problem
    assert generate_task(1, 7).problem != tasks[7].problem
    t = tasks[2]
    assert t.problem.lstrip().startswith("(define (problem plan_trial_")
    assert "(:domain alfred)" in t.problem and "(:goal" in t.problem
    assert f"(objectType ?o {t.pddl_params['object_target']}Type)" in t.problem
    assert "_bar__" in t.problem and "loc_bar_" in t.problem  # ALFRED-style mangled ids
    game = t.game()
    assert set(game) >= {"pddl_domain", "grammar", "pddl_problem", "solvable"}
    assert f"Your task is to: {t.goal_text}." in game["grammar"]
    assert t.traj_data()["pddl_params"]["object_target"] == t.pddl_params["object_target"]


# --- playing ------------------------------------------------------------------------------------------------
def test_expert_solves_one_task_of_each_type():
    env = ALFWorldEnv(split="train", num_tasks=POOL)
    thoughts = []
    try:
        for task_type, task_id in one_task_per_type().items():
            turns, info = run_expert(env, task_id)
            assert info["success"] and info["won"], (task_id, turns)
            assert info["task_type"] == task_type and info["task_id"] == task_id
            assert turns[-1][3] == 1.0 and len(turns) < env.max_steps
            for thought, action, obs, _ in turns:
                assert thought and "\n" not in thought and "\n" not in action
                assert obs != "Nothing happens."
            target = generate_task(0, int(task_id.split("trial_G")[1][:5])).pddl_params["object_target"].lower()
            assert target in turns[0][0]  # the first thought names what to look for
            thoughts += [t for t, *_ in turns]
    finally:
        env.close()
    assert len(set(thoughts)) > 0.8 * len(thoughts)  # templated but not repetitive


@pytest.mark.slow
def test_expert_success_rate_on_50_generated_tasks():
    env = ALFWorldEnv(split="train", num_tasks=100)
    try:
        results = [run_expert(env, t)[1] for t in env.task_ids()[:50]]
    finally:
        env.close()
    assert sum(r["success"] for r in results) >= 0.95 * 50


def test_wrong_actions_do_not_win():
    env = ALFWorldEnv(split="train", num_tasks=POOL, max_steps=12)
    try:
        env.reset(seed=0, options={"task_id": one_task_per_type()["pick_and_place_simple"]})
        terminated = truncated = False
        while not (terminated or truncated):  # wander between receptacles, never take anything
            goto = sorted(a for a in env.unwrapped.admissible_actions() if a.startswith("go to"))
            obs, reward, terminated, truncated, info = env.step(goto[0])
            assert obs.startswith("You arrive at") and not info["invalid_action"]
        assert truncated and not terminated and reward == 0.0 and not info["success"] and not info["won"]
        obs, _, _, _, _ = env.step("look")  # stepping on keeps working
    finally:
        env.close()


def test_invalid_actions_never_raise_and_change_nothing():
    env = ALFWorldEnv(split="train", num_tasks=POOL)
    rng = random.Random(0)
    try:
        obs0, info0 = env.reset(seed=0, options={"task_id": one_task_per_type()["pick_clean_then_place_in_recep"]})
        junk = ["", " ", "x" * 5000, "go to", "go to the moon", "take everything", "\x00\x01", "put", "héllo wörld",
                "> > >", "open fridge 999"] + ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 80)))
                                                for _ in range(20)]
        for action in junk:
            obs, reward, terminated, truncated, info = env.step(action)
            assert obs == "Nothing happens." and info["invalid_action"] and reward == 0.0 and not terminated
            assert set(obs) <= CHARSET
        assert env.unwrapped.admissible_actions() == info0["admissible_actions"]  # the state did not move
        obs, _, _, _, info = env.step("think: where would a soapbar be? maybe the sink.")
        assert obs == "OK." and not info["invalid_action"] and info["steps"] == len(junk) + 1
        # ALFWorld's commands are forgiving about case, spacing, '>' and a final period
        goto = next(a for a in info["admissible_actions"] if a.startswith("go to"))
        obs, _, _, _, info = env.step(f">  {goto.upper()}.")
        assert obs.startswith("You arrive at") and not info["invalid_action"]
    finally:
        env.close()


def test_put_and_move_are_accepted_for_each_other():
    env = ALFWorldEnv(split="train", num_tasks=POOL)
    try:
        env.reset(seed=0, options={"task_id": one_task_per_type()["pick_and_place_simple"]})
        for _ in range(40):
            thought, action = env.expert_turn()
            if action.startswith("move "):
                break
            env.step(action)
        assert action.startswith("move ") and " to " in action  # generated games use ALFWorld 0.4's grammar
        obj, dest = action[len("move "):].split(" to ")
        obs, reward, terminated, _, info = env.step(f"put {obj} in/on {dest}")
        assert obs == f"You move the {obj} to the {dest}." and terminated and info["won"]
    finally:
        env.close()


def test_same_seed_and_task_replay_the_same_episode():
    task_id = one_task_per_type()["pick_two_obj_and_place"]

    def episode(env, seed):
        obs, _ = env.reset(seed=seed, options={"task_id": task_id})
        out = [obs]
        for _ in range(6):
            thought, action = env.expert_turn()
            assert env.expert_turn() == (thought, action)  # stable until the next step
            out += [thought, action, env.step(action)[0]]
        return out

    env, other = ALFWorldEnv(split="train", num_tasks=POOL), ALFWorldEnv(split="train", num_tasks=POOL)
    try:
        first = episode(env, 3)
        assert episode(env, 3) == first
        assert episode(other, 3) == first
        assert env.reset(seed=3)[0] == other.reset(seed=3)[0]  # the seeded choice of task too
    finally:
        env.close()
        other.close()


@pytest.mark.filterwarnings("ignore:.*alternative render modes")  # the direct check has no spec; make() does
def test_gymnasium_env_checker_passes():
    env = ALFWorldEnv(split="test", num_tasks=12)  # a one-game split keeps the checker's resets cheap
    try:
        check_env(env)
    finally:
        env.close()
    env = gymnasium.make("raysad/ALFWorld-v0", split="test", num_tasks=12)
    try:
        check_env(env.unwrapped)
        assert env.unwrapped.agent_format == "alfworld" and env.unwrapped.default_max_steps == 50
    finally:
        env.close()
    env = raysad_envs.make("alfworld", split="test", num_tasks=12, max_steps=7)
    obs, info = env.reset(seed=0)
    assert obs.startswith("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room")
    assert "\n\nYour task is to: " in obs and info["task_id"] in list_tasks("test", num_tasks=12)
    env.close()


def _lib_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("libdownward" in line for line in f)


def test_close_releases_engine_without_leaking_threads_processes_or_libraries():
    import multiprocessing
    env = ALFWorldEnv(split="test", num_tasks=12)  # warm up: the first engine loads fast-downward's library
    env.reset(seed=0)
    env.close()
    threads, children, maps = threading.active_count(), len(multiprocessing.active_children()), _lib_mappings()
    for _ in range(3):
        env = ALFWorldEnv(split="test", num_tasks=12)
        env.reset(seed=0)
        env.step(env.expert_turn()[1])
        env.close()
        env.close()  # twice is fine
    assert threading.active_count() == threads
    assert len(multiprocessing.active_children()) == children
    assert _lib_mappings() == maps  # closed engines are reused, not piled up
    assert env.admissible_actions() is None


def test_prompt_has_react_examples_of_the_same_task_type():
    env = ALFWorldEnv(split="train", num_tasks=POOL)
    try:
        obs, info = env.reset(seed=0, options={"task_id": one_task_per_type()["pick_heat_then_place_in_recep"]})
        zero = env.prompt(obs, few_shot=0)
        assert zero.startswith("Interact with a household to solve a task.") and zero.endswith(obs + "\n")
        assert "move <object> to <receptacle>" in zero
        two = env.prompt(obs, few_shot=2)
        assert two.startswith("Interact with a household to solve a task. Here are two examples.\n")
        assert two.endswith("\nHere is the task.\n" + obs + "\n")
        examples = two.split("Here are two examples.\n", 1)[1].rsplit("\nHere is the task.\n", 1)[0]
        assert examples.count("Your task is to: ") == 2
        assert examples.count("> think: ") >= 4 and "\nOK.\n> " in examples
        assert "You heat the " in examples  # same task type as the task at hand
        assert obs not in examples  # held-out games
        assert env.prompt(obs, few_shot=2) == two  # cached, stable
        assert set(two) <= CHARSET
    finally:
        env.close()


# --- real ALFWorld data -------------------------------------------------------------------------------------
def test_real_data_splits_skip_and_count_unplayable_trials(caplog):
    with caplog.at_level(logging.WARNING):
        valid = ALFWorldEnv(split="valid", data=FIXTURES)
    assert valid.task_ids() == ["valid_seen/pick_and_place_simple-SprayBottle-None-GarbageCan-409/"
                                "trial_T20190908_054742_818364"]
    assert valid.skipped == {"unsolvable": 1, "no_game_file": 1}
    assert any("skipped 2" in r.getMessage() and "valid_seen" in r.getMessage() for r in caplog.records)
    test = list_tasks("test", data=FIXTURES)
    assert test == ["valid_unseen/pick_and_place_simple-SoapBottle-None-Toilet-424/trial_T20190907_004404_604165"]
    assert ALFWorldEnv(split="test", data=FIXTURES).skipped == {"unsupported_task_type": 1}
    # no train/ dir in this copy: train falls back to valid_train
    assert list_tasks("train", data=FIXTURES)[0].startswith("valid_train/pick_clean_then_place_in_recep-SoapBar")
    assert list_tasks("valid", data=FIXTURES / "json_2.1.1") == valid.task_ids()
    with pytest.raises(FileNotFoundError, match="json_2.1.1"):
        list_tasks("valid", data=FIXTURES / "logic")


def test_real_data_from_env_variable_only_when_asked(monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(FIXTURES))
    assert list_tasks("valid", data="env") == list_tasks("valid", data=FIXTURES)
    assert all("trial_G" in t for t in list_tasks("valid", num_tasks=POOL))  # data=None stays generated
    monkeypatch.delenv("ALFWORLD_DATA")
    with pytest.raises(ValueError, match="ALFWORLD_DATA"):
        list_tasks("valid", data="env")


def test_game_file_without_solvable_key_is_playable_if_it_loads(tmp_path):
    src = FIXTURES / "json_2.1.1/valid_seen/pick_and_place_simple-SprayBottle-None-GarbageCan-409"
    for name, corrupt in (("pick_and_place_simple-SprayBottle-None-GarbageCan-1", False),
                          ("pick_and_place_simple-SprayBottle-None-GarbageCan-2", True)):
        dst = tmp_path / "json_2.1.1/valid_seen" / name
        shutil.copytree(src, dst)
        game_file = next(dst.glob("*/game.tw-pddl"))
        os.chmod(game_file, 0o644)
        game = json.loads(game_file.read_text())
        del game["solvable"]
        if corrupt:
            game["pddl_problem"] = game["pddl_problem"][: len(game["pddl_problem"]) // 2]  # cut off mid-way
        game_file.write_text(json.dumps(game))
    env = ALFWorldEnv(split="valid", data=tmp_path)
    assert [t.split("/")[1] for t in env.task_ids()] == ["pick_and_place_simple-SprayBottle-None-GarbageCan-1"]
    assert env.skipped == {"failed_to_load": 1}


def test_expert_solves_a_real_game_with_its_own_grammar():
    env = ALFWorldEnv(split="valid", data=FIXTURES)
    try:
        task_id = env.task_ids()[0]
        turns, info = run_expert(env, task_id)
        assert info["success"] and info["task_type"] == "pick_and_place_simple"
        assert turns[-1][1].startswith("put spraybottle") and " in/on garbagecan 1" in turns[-1][1]
        assert turns[-1][2].startswith("You put the spraybottle")
        assert any(o.startswith("You arrive at loc ") for _, _, o, _ in turns)  # 2.1.1 grammar, verbatim
        # the 0.4 spelling works on a 2.1.1 game too
        env.reset(seed=0, options={"task_id": task_id})
        for thought, action, obs, _ in turns[:-1]:
            env.step(action)
        obj, dest = turns[-1][1][len("put "):].split(" in/on ")
        obs, reward, terminated, _, info = env.step(f"move {obj} to {dest}")
        assert terminated and info["won"] and reward == 1.0
        assert "put <object> in/on <receptacle>" in env.prompt("x")
        assert "> put " in env.prompt("x", few_shot=1) and "> move " not in env.prompt("x", few_shot=1)
    finally:
        env.close()


def test_real_data_task_id_cannot_escape_the_data_root(tmp_path):
    # a playable game just outside the data root: an id that climbs out to it must be refused, not played
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "json_2.1.1" / "valid_seen", data / "json_2.1.1" / "valid_seen")
    trial = next((FIXTURES / "json_2.1.1" / "valid_seen").glob("*/*/game.tw-pddl")).parent
    shutil.copytree(trial, tmp_path / "outside")
    env = ALFWorldEnv(split="valid", data=data)
    try:
        assert env.task_ids() and all(".." not in t for t in env.task_ids())
        for task_id in ("../../outside", "../../../../etc", str(tmp_path / "outside"), "valid_seen/../../.."):
            with pytest.raises(ValueError, match="outside the data root") as err:
                env.reset(seed=0, options={"task_id": task_id})
            assert repr(task_id) in str(err.value)
        env.reset(seed=0, options={"task_id": env.task_ids()[0]})  # listed ids still play
    finally:
        env.close()
