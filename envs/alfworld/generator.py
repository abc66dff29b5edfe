"""Offline ALFWorld task generator: PDDL problems for ALFWorld's own domain, grammar and goal library.

ALFWorld ships its engine (TextWorld's PDDL environment, `alfred.pddl`, `alfred.twl2`) but not its games, which
come from ALFRED's THOR scenes. This module writes games of the same shape without THOR: a room (kitchen,
bedroom, bathroom or living room) gets receptacles and objects drawn from ALFRED's affordance tables
(`alfworld.gen.constants`), the goal comes from ALFWorld's goal library (`alfworld.gen.goal_library`), and each
trial is saved like a real one: `initial_state.pddl`, a `traj_data.json` with the same `task_type`/`pddl_params`
keys, and `game.tw-pddl` (`pddl_domain`, `grammar`, `pddl_problem`, `solvable`). Entity names are mangled like
ALFRED's (`Mug_bar__plus_01_dot_20_bar_...`) so that ALFWorld's `AlfredDemangler` names them "mug 1", "mug 2".

Everything is a pure function of (seed, index): task `index` of a pool never depends on the pool's size.
Games are solvable by construction (tests and benchmarks/alfworld_env.py check it with the planner).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import alfworld.gen.constants as C
import alfworld.gen.goal_library as goal_library
from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

from ..core import stable_hash

GENERATOR_VERSION = 1  # bump when the output of generate_task changes (it keys the on-disk cache)

TASK_TYPES = (
    "pick_and_place_simple",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "look_at_obj_in_light",
    "pick_two_obj_and_place",
)
ROOM_TYPES = ("Kitchen", "LivingRoom", "Bedroom", "Bathroom")

# receptacle type -> (min, max) instances, per room; loosely after ALFRED's floor plans
ROOMS: dict[str, dict[str, tuple[int, int]]] = {
    "Kitchen": {"Cabinet": (3, 9), "CounterTop": (1, 3), "Drawer": (1, 6), "Fridge": (1, 1), "Microwave": (1, 1),
                "SinkBasin": (1, 1), "StoveBurner": (2, 4), "CoffeeMachine": (1, 1), "GarbageCan": (1, 1),
                "DiningTable": (0, 1), "Shelf": (0, 3), "Toaster": (1, 1)},
    "LivingRoom": {"Sofa": (1, 1), "ArmChair": (0, 2), "CoffeeTable": (1, 1), "SideTable": (0, 3), "Drawer": (0, 4),
                   "Cabinet": (0, 4), "Shelf": (0, 6), "TVStand": (0, 1), "Dresser": (0, 1), "GarbageCan": (1, 1),
                   "DiningTable": (0, 1), "Ottoman": (0, 1), "Safe": (0, 1)},
    "Bedroom": {"Bed": (1, 1), "Desk": (0, 1), "SideTable": (1, 2), "Drawer": (2, 6), "Dresser": (0, 1),
                "Shelf": (0, 6), "GarbageCan": (1, 1), "LaundryHamper": (0, 1), "Safe": (0, 1), "ArmChair": (0, 1)},
    "Bathroom": {"SinkBasin": (1, 2), "BathtubBasin": (0, 1), "Cabinet": (1, 4), "CounterTop": (1, 1),
                 "Drawer": (0, 4), "GarbageCan": (1, 1), "HandTowelHolder": (1, 2), "Toilet": (1, 1),
                 "ToiletPaperHanger": (1, 1), "TowelHolder": (1, 2), "Shelf": (0, 2), "Dresser": (0, 1), "Cart": (0, 1)},
}
# objects one finds in each room (subject to a receptacle there being able to hold them)
ROOM_OBJECTS: dict[str, tuple[str, ...]] = {
    "Kitchen": ("Apple", "Bread", "Egg", "Potato", "Tomato", "Lettuce", "Mug", "Cup", "Bowl", "Plate", "Pan", "Pot",
                "Fork", "Spoon", "Knife", "ButterKnife", "Spatula", "Ladle", "DishSponge", "SoapBottle",
                "PepperShaker", "SaltShaker", "Kettle", "WineBottle", "Glassbottle", "PaperTowel"),
    "LivingRoom": ("RemoteControl", "KeyChain", "CreditCard", "Newspaper", "Laptop", "Pillow", "Box", "Statue",
                   "Vase", "Watch", "WateringCan", "Book", "Plate", "Bowl", "TissueBox", "CellPhone", "Candle"),
    "Bedroom": ("AlarmClock", "Book", "CD", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Pen", "Pencil",
                "Pillow", "TennisRacket", "BaseballBat", "BasketBall", "Bowl", "Mug", "Box", "Vase", "Statue",
                "Watch", "Cloth"),
    "Bathroom": ("SoapBar", "SoapBottle", "SprayBottle", "ToiletPaper", "Towel", "HandTowel", "Candle", "Cloth",
                 "DishSponge", "Plunger", "TissueBox", "PaperTowel"),
}
# what one examines under a lamp in ALFRED's look_at_obj_in_light tasks
LOOK_OBJECTS = ("AlarmClock", "Book", "Bowl", "CD", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Mug", "Pen",
                "Pencil", "Pillow", "Box", "Statue", "Vase", "Watch", "RemoteControl", "Newspaper", "Cloth")
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")
# the appliance a state-change task needs, and the affordance the object must have
APPLIANCE = {"pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
             "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
             "pick_cool_then_place_in_recep": ("Fridge", "Coolable")}
AFFORDANCE_PREDICATE = {"Cleanable": "cleanable", "Heatable": "heatable", "Coolable": "coolable",
                        "Toggleable": "toggleable", "Sliceable": "sliceable"}
CAN_CONTAIN = {r: frozenset(objs) for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
OPENABLE = frozenset(C.OPENABLE_CLASS_LIST)
# every type the domain or a goal may name must be declared in the problem, as ALFRED's problems do
RTYPES = sorted(set(C.RECEPTACLES) - C.MOVABLE_RECEPTACLES_SET)
OTYPES = sorted(set(C.OBJECTS) - set(RTYPES))


@dataclass
class Entity:
    kind: str           # "object" or "receptacle"
    type: str           # ALFRED class, e.g. "Mug", "CounterTop"
    id: str             # mangled ALFRED id, e.g. "Mug_bar__plus_01_dot_20_bar__plus_00_dot_90_bar__minus_02_dot_10"
    location: str = ""  # PDDL location (receptacles: where one stands to reach them; objects: their receptacle's)
    parent: str = ""    # objects: id of the receptacle holding them


@dataclass
class GeneratedTask:
    task_id: str
    task_type: str
    room: str
    pddl_params: dict
    goal_text: str
    problem: str
    entities: list[Entity] = field(default_factory=list)

    def traj_data(self) -> dict:
        """Metadata with the keys of ALFRED/ALFWorld's traj_data.json that loaders read."""
        return {"task_id": self.task_id, "task_type": self.task_type, "pddl_params": self.pddl_params,
                "scene": {"room_type": self.room, "floor_plan": f"Generated{self.room}", "scene_num": 0},
                "turk_annotations": {"anns": [{"task_desc": self.goal_text, "high_descs": [], "votes": []}]},
                "generated_by": f"raysad_envs.alfworld.generator v{GENERATOR_VERSION}"}

    def game(self) -> dict:
        """The game.tw-pddl content: ALFWorld's domain and grammar with this task's goal text."""
        grammar = _read(ALFRED_TWL2_PATH).replace("UNKNOWN GOAL", self.goal_text)
        return {"pddl_domain": _read(ALFRED_PDDL_PATH), "grammar": grammar, "pddl_problem": self.problem,
                "solvable": True, "walkthrough": None}


_FILES: dict[str, str] = {}


def _read(path: str) -> str:
    if path not in _FILES:
        _FILES[path] = Path(path).read_text()
    return _FILES[path]


def _coord(value: float) -> str:
    sign = "_minus_" if value < 0 else "_plus_"
    return sign + f"{abs(value):05.2f}".replace(".", "_dot_")


def _mangle(cls: str, xyz: tuple[float, float, float]) -> str:
    base = "_bar_".join([cls if not cls.endswith("Basin") else cls[: -len("Basin")]] + [_coord(v) for v in xyz])
    return base + (f"_bar_{cls}" if cls.endswith("Basin") else "")  # "Sink_bar_..._bar_SinkBasin" as in ALFRED


def _location(x: int, z: int, rotation: int, horizon: int) -> str:
    part = lambda v: f"_minus_{-v}" if v < 0 else str(v)  # noqa: E731
    return "loc_bar_" + "_bar_".join(part(v) for v in (x, z, rotation, horizon))


class _Room:
    """Receptacles and objects of one generated room; unique mangled ids and locations."""

    def __init__(self, rng: random.Random, room: str):
        self.rng, self.room = rng, room
        self.entities: list[Entity] = []
        self._ids: set[str] = set()
        self._locations: set[str] = set()
        for rtype, (lo, hi) in ROOMS[room].items():
            for _ in range(rng.randint(lo, hi)):
                self.add_receptacle(rtype)

    def _unique_id(self, cls: str) -> str:
        while True:
            xyz = tuple(round(self.rng.uniform(-4.0, 4.0), 2) for _ in range(3))
            ident = _mangle(cls, xyz)
            if ident not in self._ids:
                self._ids.add(ident)
                return ident

    def new_location(self) -> str:
        while True:
            loc = _location(self.rng.randint(-12, 12), self.rng.randint(-12, 12), self.rng.randint(0, 3),
                            self.rng.choice((0, 15, 30, 45, 60)))
            if loc not in self._locations:
                self._locations.add(loc)
                return loc

    def add_receptacle(self, rtype: str) -> Entity:
        # one receptacle per location, so that "go to X" names exactly one receptacle
        ent = Entity("receptacle", rtype, self._unique_id(rtype), self.new_location())
        self.entities.append(ent)
        return ent

    def receptacles(self, rtype: str | None = None) -> list[Entity]:
        return [e for e in self.entities if e.kind == "receptacle" and (rtype is None or e.type == rtype)]

    def objects(self, otype: str | None = None) -> list[Entity]:
        return [e for e in self.entities if e.kind == "object" and (otype is None or e.type == otype)]

    def holders(self, otype: str, exclude: set[str] = frozenset()) -> list[Entity]:
        return [r for r in self.receptacles() if otype in CAN_CONTAIN.get(r.type, ()) and r.type not in exclude]

    def place(self, otype: str, receptacle: Entity) -> Entity:
        ent = Entity("object", otype, self._unique_id(otype), receptacle.location, receptacle.id)
        self.entities.append(ent)
        return ent


def _choose_goal(rng: random.Random, room: _Room, task_type: str) -> tuple[str, str, str] | None:
    """(object type, parent receptacle type, toggle type) for a task that this room can host, or None."""
    if task_type == "look_at_obj_in_light":
        if not any(room.receptacles(r) for r in LAMP_HOLDERS):
            return None
        candidates = [o for o in LOOK_OBJECTS if room.holders(o)]
        return (rng.choice(candidates), "", "DeskLamp") if candidates else None
    appliance, affordance = APPLIANCE.get(task_type, (None, None))
    if appliance and not room.receptacles(appliance):
        return None
    pool = [o for o in ROOM_OBJECTS[room.room] if affordance is None or o in C.VAL_ACTION_OBJECTS[affordance]]
    rng.shuffle(pool)
    for otype in pool:
        parents = sorted({r.type for r in room.holders(otype, exclude={appliance} if appliance else set())})
        for ptype in rng.sample(parents, len(parents)):
            # the objects must start somewhere other than a receptacle of the parent's type
            if room.holders(otype, exclude={ptype}):
                return otype, ptype, ""
    return None


def generate_task(seed: int, index: int) -> GeneratedTask:
    """Task `index` of the pool drawn from `seed`; task types cycle so every type is in every pool of >= 6."""
    task_type = TASK_TYPES[index % len(TASK_TYPES)]
    rng = random.Random(stable_hash("alfworld-task", GENERATOR_VERSION, seed, index))
    rooms = [r for r in ROOM_TYPES if r in C.GOALS_VALID[task_type]]
    for _attempt in range(100):
        room = _Room(rng, rng.choice(rooms))
        goal = _choose_goal(rng, room, task_type)
        if goal is not None:
            return _populate(rng, room, task_type, index, *goal)
    raise RuntimeError(f"could not generate a {task_type} task for seed={seed} index={index}")


def _populate(rng: random.Random, room: _Room, task_type: str, index: int, otype: str, ptype: str,
              toggle: str) -> GeneratedTask:
    if toggle:
        lamp_holder = rng.choice([r for r in room.receptacles() if r.type in LAMP_HOLDERS])
        room.place(toggle, lamp_holder)
    # the targets: one to three instances (two to three for pick_two), never already in a parent-type receptacle
    n_targets = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 3)
    sources = room.holders(otype, exclude={ptype} if ptype else set())
    for _ in range(n_targets):
        room.place(otype, rng.choice(sources))
    # distractors: other objects of the room wherever they fit; a distractor never satisfies the goal
    others = [o for o in ROOM_OBJECTS[room.room] if o != otype and room.holders(o)]
    for _ in range(rng.randint(6, 18)):
        o = rng.choice(others)
        room.place(o, rng.choice(room.holders(o)))
    start = room.new_location()

    template = rng.choice(goal_library.gdict[task_type]["templates"])
    goal_text = template.format(obj=otype.lower(), recep=ptype.lower(), toggle=toggle.lower())
    goal_pddl = goal_library.gdict[task_type]["pddl"].replace("#", "-").format(obj=otype, recep=ptype, toggle=toggle)
    trial = f"trial_G{index:05d}_{stable_hash(goal_text, start)}"
    task_id = f"{task_type}-{otype}-None-{ptype or toggle}-{room.room}/{trial}"
    problem = _problem(trial, room, start, goal_pddl)
    params = {"object_target": otype, "parent_target": ptype, "toggle_target": toggle, "mrecep_target": "",
              "object_sliced": False}
    return GeneratedTask(task_id, task_type, room.room, params, goal_text, problem, room.entities)


def _problem(trial: str, room: _Room, start: str, goal_pddl: str) -> str:
    objects = sorted(room.objects(), key=lambda e: e.id)
    receptacles = sorted(room.receptacles(), key=lambda e: e.id)
    present_otypes = sorted({o.type for o in objects})
    present_rtypes = sorted({r.type for r in receptacles})
    locations = sorted({r.location for r in receptacles} | {start})
    indent = "\n        "
    decl = (["agent1 - agent"] + [f"{t}Type - otype" for t in OTYPES] + [f"{t}Type - rtype" for t in RTYPES]
            + [f"{o.id} - object" for o in objects] + [f"{r.id} - receptacle" for r in receptacles]
            + [f"{loc} - location" for loc in locations])
    init = [f"(atLocation agent1 {start})"]
    init += [f"(receptacleType {r.id} {r.type}Type)" for r in receptacles]
    init += [f"(objectType {o.id} {o.type}Type)" for o in objects]
    init += [f"(canContain {rt}Type {ot}Type)" for rt in present_rtypes for ot in present_otypes
             if ot in CAN_CONTAIN.get(rt, ())]
    init += [f"(pickupable {o.id})" for o in objects if o.type not in C.VAL_ACTION_OBJECTS["Toggleable"]]
    init += [f"(openable {r.id})" for r in receptacles if r.type in OPENABLE]
    for affordance, predicate in AFFORDANCE_PREDICATE.items():
        init += [f"({predicate} {o.id})" for o in objects if o.type in C.VAL_ACTION_OBJECTS[affordance]]
    init += [f"(inReceptacle {o.id} {o.parent})" for o in objects]
    init += [f"(receptacleAtLocation {r.id} {r.location})" for r in receptacles]
    init += [f"(objectAtLocation {o.id} {o.location})" for o in objects]
    return (f"\n(define (problem plan_{trial})\n(:domain alfred)\n(:objects\n" + indent.join(decl)
            + "\n        )\n    \n\n(:init\n" + indent + indent.join(init) + "\n        )\n    \n" + goal_pddl)


def write_trial(task: GeneratedTask, root: Path) -> Path:
    """Write the trial dir (initial_state.pddl, traj_data.json, game.tw-pddl) under root; returns the game file.

    Writes go through a temporary dir renamed into place, so concurrent workers never read half a file."""
    trial_dir = root / task.task_id
    game_file = trial_dir / "game.tw-pddl"
    if game_file.exists():
        return game_file
    trial_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=trial_dir.parent, prefix=".tmp-"))
    (tmp / "initial_state.pddl").write_text(task.problem)
    (tmp / "traj_data.json").write_text(json.dumps(task.traj_data(), indent=1))
    (tmp / "game.tw-pddl").write_text(json.dumps(task.game()))
    try:
        os.rename(tmp, trial_dir)
    except OSError:  # another worker won the race; its files are identical
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return game_file
