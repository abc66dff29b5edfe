"""The scripted ALFWorld expert: a hand-coded policy over the true game state, with a thought every turn.

It plays like ALFWorld's hand-coded expert (find the object, take it, clean/heat/cool it, put it in the
receptacle; or take it to a lamp and use the lamp) but reads the true state from the engine instead of parsing
text, and searches like a person: before the receptacle that really holds what it needs it checks 0-3
plausible others (receptacles that can hold that class), so transcripts show search and discovery. When it
meets a state it has no rule for (the agent wandered off holding something else, an odd real game), it asks
fast-downward's planner for the next command. Thoughts are templated, grounded in what the agent has seen,
and varied by an RNG seeded per episode.
"""
from __future__ import annotations

import random
import re

from .engine import Engine, World, _natural

APPLIANCES = {"pick_clean_then_place_in_recep": ("sinkbasin", "clean", "cleaned", "clean"),
              "pick_heat_then_place_in_recep": ("microwave", "heat", "heated", "hot"),
              "pick_cool_then_place_in_recep": ("fridge", "cool", "cooled", "cool")}
LAMP_PLACES = ("desk", "sidetable", "dresser", "shelf", "nightstand")


def group_names(names: list[str]) -> str:
    """['cabinet 1', 'cabinet 2', 'cabinet 3', 'countertop 1'] -> 'cabinet (1-3), countertop (1)' (ReAct style)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        head, _, num = name.rpartition(" ")
        groups.setdefault(head or name, []).append(int(num) if num.isdigit() else 0)
    parts = []
    for head, nums in groups.items():
        nums = sorted(nums)
        if len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
            parts.append(f"{head} ({nums[0]}-{nums[-1]})")
        else:
            parts.append(f"{head} ({', '.join(map(str, nums))})")
    return ", ".join(parts)


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _list(items: list[str]) -> str:
    items = [_a(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


class Expert:
    def __init__(self, task_type: str, params: dict, rng: random.Random, engine: Engine):
        self.task_type, self.rng, self.engine = task_type, rng, engine
        self.obj = (params.get("object_target") or "").lower()
        self.parent = (params.get("parent_target") or "").lower()
        self.toggle = (params.get("toggle_target") or "").lower()
        self.appliance, self.verb, self.verbed, self.adjective = APPLIANCES.get(task_type, ("", "", "", ""))
        self.needed = 2 if task_type == "pick_two_obj_and_place" else 1
        self.seen: set[str] = set()            # receptacles whose contents the agent has seen
        self.at: str | None = None             # receptacle the agent last went to
        self.routes: dict[str, list[str]] = {}  # class -> receptacles to check, the last one holds it
        self.dest: str | None = None
        self.searches = 0                       # searches started (the first turn also states the plan)
        self.turns = 0
        self.last_receptacle: str | None = None  # where the last search stop was, for "nothing there"

    # --- memory -----------------------------------------------------------------------------------------
    def observe(self, command: str, world: World) -> None:
        """Called after every command the engine executed (the expert's or anyone's)."""
        m = re.fullmatch(r"(go to|open|examine) (.+)", command)
        if m and m[2] in world.location:
            if m[1] == "go to":
                self.at = m[2]
            if not world.is_closed(m[2]):
                self.seen.add(m[2])

    # --- decision -----------------------------------------------------------------------------------------
    def turn(self) -> tuple[str, str]:
        w = self.engine.world()
        here = self.at if self.at in w.receptacles_here() else next(iter(w.receptacles_here()), None)
        decision = self._decide(w, here)
        admissible = self.engine.admissible
        if decision is None or decision[1] not in admissible:
            plan = self.engine.plan()
            action = plan[0] if plan and plan[0] in admissible else "look"
            decision = ("plan", action, {})
        event, action, slots = decision
        thought = self._thought(event, action, slots, w, here)
        thought = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", thought[:1].upper() + thought[1:])
        self.turns += 1
        return thought, action

    def _placed(self, w: World) -> list[str]:
        """Target objects already where the goal wants them (in the chosen destination, in the right state)."""
        if not self.dest:
            return []
        return [o for o in w.contents.get(self.dest, []) if w.otype.get(o) == self.obj and self._ready(w, o)]

    def _ready(self, w: World, o: str) -> bool:
        return not self.adjective or o in {"clean": w.clean, "hot": w.hot, "cool": w.cool}[self.adjective]

    def _choose_dest(self, w: World) -> str | None:
        if self.dest is None and self.parent:
            options = [r for r in w.receptacles() if w.rtype.get(r) == self.parent]
            # a receptacle that already holds one of two targets saves a trip
            holding = [r for r in options if any(w.otype.get(o) == self.obj for o in w.contents.get(r, []))]
            self.dest = holding[0] if holding and self.needed == 2 else (self.rng.choice(options) if options else None)
        return self.dest

    def _decide(self, w: World, here: str | None):
        dest = self._choose_dest(w)
        held = w.holding[0] if w.holding else None
        if held is None:
            return self._search(w, here, self.obj, exclude=set(self._placed(w)))
        if w.otype.get(held) != self.obj:
            return None  # holding something the task does not need: let the planner sort it out
        if self.appliance and not self._ready(w, held):
            app = next((r for r in w.receptacles() if w.rtype.get(r) == self.appliance), None)
            if app is None:
                return None
            if here != app:
                return "go_appliance", f"go to {app}", {"o": held, "app": app}
            return "apply", f"{self.verb} {held} with {app}", {"o": held, "app": app}
        if self.toggle:
            lamps = [o for o, c in w.otype.items() if c == self.toggle and o in w.parent]
            at_lamp = [lamp for lamp in lamps if w.parent[lamp] == here]
            if at_lamp:
                return "use_lamp", f"use {at_lamp[0]}", {"o": held, "lamp": at_lamp[0], "r": here}
            return self._search(w, here, self.toggle, exclude=set(), held=held)
        if dest is None:
            return None
        if here != dest:
            return "go_dest", f"go to {dest}", {"o": held, "r": dest}
        if w.is_closed(dest):
            return "open_dest", f"open {dest}", {"o": held, "r": dest}
        return "put", self.engine.put_template.format(o=held, r=dest), {"o": held, "r": dest}

    def _search(self, w: World, here: str | None, cls: str, exclude: set[str], held: str | None = None):
        """Next step towards an object of class `cls`: go to a receptacle, open it, or take the object."""
        available = [o for o, c in w.otype.items() if c == cls and o in w.parent and o not in exclude
                     and w.parent[o] != self.dest]
        holders = sorted({w.parent[o] for o in available}, key=_natural)
        if not holders:
            return None
        slots = {"cls": cls, "held": held}
        route = self.routes.get(cls)
        if not route or route[-1] not in holders:
            route = self.routes[cls] = self._route(w, cls, holders, here)
            self.searches += 1
            slots["new_search"] = True
        if here and w.is_closed(here) and (here in route or here in holders):
            return "open_search", f"open {here}", {**slots, "r": here}
        if here in holders and cls != self.toggle:
            obj = sorted((o for o in available if w.parent[o] == here), key=_natural)[0]
            return "take", f"take {obj} from {here}", {**slots, "o": obj, "r": here}
        known = [r for r in holders if r in self.seen and r != here]
        if known:
            return "go_known", f"go to {known[0]}", {**slots, "r": known[0]}
        nxt = next((r for r in route if r not in self.seen and r != here), route[-1])
        slots["prev"] = here if here and here in self.seen and here not in holders else None
        return "go_search", f"go to {nxt}", {**slots, "r": nxt, "route": route}

    def _route(self, w: World, cls: str, holders: list[str], here: str | None) -> list[str]:
        """Some plausible receptacles without the object, then one that has it."""
        target = self.rng.choice([r for r in holders if r not in self.seen] or holders)
        places = LAMP_PLACES if cls == self.toggle else ()
        plausible = [r for r in w.receptacles() if r not in holders and r not in self.seen and r != here
                     and r != self.dest and ((w.rtype.get(r), cls) in w.can_contain or w.rtype.get(r) in places)]
        detours = self.rng.sample(plausible, min(len(plausible), self.rng.choice((0, 1, 1, 2, 2, 3))))
        return detours + [target]

    # --- thoughts -----------------------------------------------------------------------------------------
    def _pick(self, *options: str) -> str:
        return self.rng.choice(options)

    def _overview(self) -> str:
        o, p = self.obj, self.parent
        if self.toggle:
            steps = f"find and take a {o}, then find and use a {self.toggle}"
        elif self.needed == 2:
            steps = f"find and take the first {o}, then put it in/on {p}, then find and take the second {o}, " \
                    f"then put it in/on {p}"
        elif self.appliance:
            steps = f"find and take a {o}, then {self.verb} it with {self.appliance}, then put it in/on {p}"
        else:
            steps = f"find and take a {o}, then put it in/on {p}"
        return self._pick(f"To solve the task, I need to {steps}.", f"My plan: {steps}.",
                          f"The task needs me to {steps}.")

    def _remaining(self, w: World) -> str:
        """What is left after the current object is in hand and ready."""
        if self.needed == 2 and len(self._placed(w)) == 1:
            return f"that makes two {self.obj}s in/on {self.dest}, which finishes the task"
        if self.needed == 2:
            return f"then I still need to find a second {self.obj}"
        return "that should finish the task"

    def _thought(self, event: str, action: str, s: dict, w: World, here: str | None) -> str:
        o, r = s.get("o", ""), s.get("r", "")
        if event == "go_search":
            cls, route = s["cls"], s["route"]
            if s.get("new_search"):
                cands = [x for x in w.receptacles() if x in route or (w.rtype.get(x), cls) in w.can_contain
                         or (cls == self.toggle and w.rtype.get(x) in LAMP_PLACES)]
                cands = [x for x in cands if x not in self.seen and x != self.dest] or route
                first = [x for x in cands if x.rpartition(" ")[0] == r.rpartition(" ")[0]]
                where = group_names(first + [x for x in cands if x not in first])
                intro = ""
                if self.turns == 0:
                    intro = self._overview() + " "
                elif s.get("held"):
                    intro = self._pick(f"Now I take {s['held']}. Next, I need to find a {cls}. ",
                                       f"I have {s['held']}. Now I need a {cls} to look at it under. ")
                elif self.needed == 2 and self.searches > 1:
                    intro = self._pick(f"Now I need to find the second {cls}. ",
                                       f"One {cls} is done. I still need another {cls}. ")
                body = self._pick(
                    f"First I need to find a {cls}. A {cls} is more likely to appear in {where}. "
                    f"I can check one by one, starting with {r}.",
                    f"I should look for a {cls}. Good places for a {cls} are {where}; I'll start with {r}.",
                    f"Where could a {cls} be? Probably in {where}. Let me check {r} first.")
                if intro and not self.turns == 0:
                    body = body.replace("First I need to find", "I need to find")
                return intro + body
            prev = s.get("prev")
            if prev:
                things = w.contents.get(prev, [])
                seen_there = f"I see {_list(things)} in/on {prev}, but no {cls}." if things else f"{prev} is empty."
                return self._pick(f"There is no {cls} in/on {prev}. Next, I'll check {r}.",
                                  f"{seen_there} I'll try {r} next.",
                                  f"No {cls} in/on {prev}. The next place to check is {r}.")
            return self._pick(f"I still need a {cls}. Let me check {r}.",
                              f"Next, I'll look for a {cls} in/on {r}.")
        if event == "open_search":
            return self._pick(f"The {r} is closed. I'll open it to see if there is a {s['cls']} inside.",
                              f"{r} is closed; a {s['cls']} might be inside, so I'll open it.",
                              f"I need to open {r} to look for a {s['cls']}.")
        if event == "take":
            nxt = (f"then {self.verb} it with {self.appliance}" if self.appliance
                   else f"then take it to a {self.toggle}" if self.toggle else f"then put it in/on {self.parent}")
            return self._pick(f"Now I find a {s['cls']} ({o}) in/on {r}. Next, I need to take it.",
                              f"There it is: {o} in/on {r}. I'll pick it up, {nxt}.",
                              f"{r} has {o}, which is what I need. Taking it now; {nxt}.")
        if event == "go_known":
            return self._pick(f"I remember seeing a {s['cls']} in/on {r}. I'll go back there to take it.",
                              f"I saw a {s['cls']} in/on {r} earlier, so I'll go there.")
        if event == "go_appliance":
            return self._pick(f"Now I take {o}. Next, I need to go to {s['app']} and {self.verb} it.",
                              f"I have {o}. To {self.verb} it I need the {s['app'].rpartition(' ')[0]}, "
                              f"so I'll go to {s['app']}.",
                              f"Got {o}. Next: {self.verb} it with {s['app']}, then put it in/on {self.parent}.")
        if event == "apply":
            return self._pick(f"I'm at {s['app']} with {o}. I'll {self.verb} it now; after that I'll put it "
                              f"in/on {self.parent}.",
                              f"Now I can {self.verb} {o} with {s['app']}.")
        if event == "go_dest":
            done = f"Now I {self.verbed} {o}" if self.appliance else f"Now I take {o}"
            if self.needed == 2 and self._placed(w):
                done = f"Now I have the second {self.obj}, {o}"
            return self._pick(f"{done}. Next, I need to put it in/on {r}.",
                              f"{done}. I'll bring it to {r}.",
                              f"{done}. The task wants it in/on {self.parent}, so I'll go to {r}.")
        if event == "open_dest":
            return self._pick(f"The {r} is closed. I need to open it before I can put {o} in it.",
                              f"{r} is closed; I'll open it first.")
        if event == "put":
            return self._pick(f"I'm at {r} with {o}. I'll put it in/on {r}; {self._remaining(w)}.",
                              f"Now I put {o} in/on {r}; {self._remaining(w)}.")
        if event == "use_lamp":
            return self._pick(f"Now I find {s['lamp']} in/on {r}, and I'm holding {o}. I'll turn it on to "
                              f"examine the {self.obj} under the light.",
                              f"{s['lamp']} is here and I have {o}. Using the {self.toggle} completes the task.")
        return self._pick(f"I'm not where my plan expected, so I'll work it out again: next I'll {action}.",
                          f"Let me get back on track toward the goal: {action}.")
