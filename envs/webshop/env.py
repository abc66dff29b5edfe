"""WebShop as a text gymnasium environment: search a product catalog, open items, pick options, buy.

Pages and transitions follow princeton-nlp/WebShop's SimServer (web_agent_site/envs/web_agent_text_env.py);
observations use the bracket text of the ReAct WebShop prompt, where `[x]` is something to click:

    WebShop                               [Back to Search]                  [Back to Search]
    Instruction:                          Page 1 (Total results: 50)        [< Prev]
    i need a ..., and price lower         [Next >]                          size [small][[medium]][large]
    than 40.00 dollars                    [B0ABC12345]                      <title>
    [Search]                              <title>                           Price: $10.99
                                          $10.99                            Rating: N.A.
                                          ...                               [Description] [Features] [Reviews] [Buy Now]

Actions: `search[query]` (on the search page), `click[element]` (element text, any case), `think[...]` (answers
"OK.", changes nothing, costs a step). Buying ends the episode with WebShop's reward (goal.get_reward); success
is a reward of 1. The reward matches options by the rule of WebShop's master branch; WebShopEnv(option_matching=
"v2") (or raysad_envs.make("webshop", option_matching="v2")) uses the rule of WebShop commit 6ba9969 of its v2
line instead (see goal.py).
"""
from __future__ import annotations

import random
import re

from ..core import OBS_MAX_CHARS, InvalidAction, TextEnv, stable_hash, to_text
from .catalog import PRODUCT_WINDOW, Shop, get_shop
from .goal import check_option_matching, get_option_reward, get_reward, normalize_color

BACK_TO_SEARCH, NEXT_PAGE, PREV_PAGE, BUY = "Back to Search", "Next >", "< Prev", "Buy Now"
SUB_PAGES = ("Description", "Features", "Reviews")
ACTION_RE = re.compile(r"^\s*(search|click|think)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]


def _clean(text) -> str:
    """One line of page text: whitespace collapsed (real descriptions hold newlines)."""
    return " ".join(str(text).split())


class Session:
    """One shopper's browser state on the shop, and the pages it renders."""

    def __init__(self, shop: Shop, goal: dict, option_matching: str = "master"):
        self.shop, self.goal = shop, goal
        self.option_matching = check_option_matching(option_matching)
        self.page = "search"         # search | results | item | sub | done
        self.query = ""
        self.results: list[str] = []  # asins of the current search, best first
        self.page_num = 1
        self.asin: str | None = None
        self.options: dict[str, str] = {}
        self.sub_page = ""
        self.searches: list[str] = []
        self.visited: set[tuple[str, str]] = set()  # (asin, sub page) seen this episode
        self.reward: float | None = None
        self.reward_info: dict = {}

    # --- what can be clicked ---------------------------------------------------------------------------------
    def clickables(self) -> dict[str, tuple[str, str, str]]:
        """lower-cased text -> (shown text, kind, value); buttons win over option values of the same text."""
        items: list[tuple[str, str, str]] = []
        if self.page == "results":
            items.append((BACK_TO_SEARCH, "button", BACK_TO_SEARCH))
            if self.page_num > 1:
                items.append((PREV_PAGE, "button", PREV_PAGE))
            if self.page_num * PRODUCT_WINDOW < len(self.results):
                items.append((NEXT_PAGE, "button", NEXT_PAGE))
            items += [(asin, "product", asin) for asin in self.page_results()]
        elif self.page == "item":
            items += [(BACK_TO_SEARCH, "button", BACK_TO_SEARCH), (PREV_PAGE, "button", PREV_PAGE)]
            items += [(s, "button", s) for s in SUB_PAGES] + [(BUY, "button", BUY)]
            for name, values in self.product()["options"].items():
                items += [(v, "option", name) for v in values]
        elif self.page == "sub":
            items += [(BACK_TO_SEARCH, "button", BACK_TO_SEARCH), (PREV_PAGE, "button", PREV_PAGE)]
        out: dict[str, tuple[str, str, str]] = {}
        for shown, kind, value in items:
            out.setdefault(shown.lower(), (shown, kind, value))
        return out

    def admissible(self) -> list[str]:
        if self.page == "search":
            return ["search[<query>]"]
        return [f"click[{shown}]" for shown, _, _ in self.clickables().values()]

    def page_results(self) -> list[str]:
        return self.results[(self.page_num - 1) * PRODUCT_WINDOW: self.page_num * PRODUCT_WINDOW]

    def product(self) -> dict:
        return self.shop.product_item_dict[self.asin]

    # --- pages -------------------------------------------------------------------------------------------------
    def observation(self) -> str:
        if self.page == "search":
            return f"WebShop\nInstruction:\n{_clean(self.goal['instruction_text'])}\n[Search]"
        if self.page == "results":
            lines = [f"[{BACK_TO_SEARCH}]", f"Page {self.page_num} (Total results: {len(self.results)})"]
            if self.page_num > 1:
                lines.append(f"[{PREV_PAGE}]")
            if self.page_num * PRODUCT_WINDOW < len(self.results):
                lines.append(f"[{NEXT_PAGE}]")
            for asin in self.page_results():
                p = self.shop.product_item_dict[asin]
                lines += [f"[{asin}]", _clean(p["Title"]), _clean(p["Price"])]
            return "\n".join(lines)
        p = self.product() if self.asin else {}
        head = [f"[{BACK_TO_SEARCH}]", f"[{PREV_PAGE}]"]
        if self.page == "item":
            lines = head[:]
            for name, values in p["options"].items():
                chosen = self.options.get(name)
                lines.append(f"{name} " + "".join(f"[[{v}]]" if v == chosen else f"[{v}]" for v in values))
            lines += [_clean(p["Title"]), f"Price: {_clean(p['Price'])}", f"Rating: {_clean(p.get('Rating', 'N.A.'))}"]
            lines += [f"[{s}]" for s in SUB_PAGES] + [f"[{BUY}]"]
            return "\n".join(lines)
        if self.page == "sub":
            if self.sub_page == "Description":
                body = [_clean(p["Description"]) or "No description."]
            elif self.sub_page == "Features":
                body = [_clean(b) for b in p["BulletPoints"] if _clean(b)] or ["No features listed."]
            else:
                body = [line for r in p.get("Reviews") or [] for line in
                        (_clean(r.get("title", "")), f"Score: {r.get('score')}", _clean(r.get("body", ""))) if line]
                body = body or ["No reviews yet."]
            return "\n".join(head + body)
        return f"Your score (min 0.0, max 1.0): {round(self.reward or 0.0, 4)}"

    # --- actions -----------------------------------------------------------------------------------------------
    def step(self, action: str) -> tuple[str, float, bool, dict]:
        m = ACTION_RE.match(action)
        if m is None:
            raise InvalidAction(f"expected search[query], click[element] or think[thought], got {action[:80]!r}")
        verb, arg = m.group(1).lower(), m.group(2).strip()
        if verb == "think":
            return "OK.", 0.0, False, {}
        if verb == "search":
            if self.page != "search":
                raise InvalidAction("there is no search bar on this page; click [Back to Search] first")
            if not arg:
                raise InvalidAction("search[] needs a query")
            self.query = _clean(arg).lower()
            self.searches.append(self.query)
            self.results = self.shop.search(self.query)
            self.page, self.page_num = "results", 1
            return self.observation(), 0.0, False, {}
        clickables = self.clickables()
        key = _clean(arg).lower()
        if key not in clickables and key.strip("[]") in clickables:  # tolerate click[[medium]] copied from the page
            key = key.strip("[]")
        if key not in clickables:
            if self.page == "search":
                raise InvalidAction("nothing to click on the search page; use search[query]")
            shown = ", ".join(f"[{s}]" for s, _, _ in clickables.values())
            raise InvalidAction(f"no [{arg[:80]}] to click on this page; clickable: {shown}")
        shown, kind, value = clickables[key]
        if kind == "product":
            self.page, self.asin, self.options = "item", value, {}
        elif kind == "option":
            self.options[value] = shown
            return f"You have clicked {shown}.", 0.0, False, {}
        elif value == BACK_TO_SEARCH:
            self.page, self.query, self.results, self.asin, self.options = "search", "", [], None, {}
        elif value == NEXT_PAGE:
            self.page_num += 1
        elif value == PREV_PAGE:
            if self.page == "results":
                self.page_num -= 1
            elif self.page == "item":
                self.page, self.asin, self.options = "results", None, {}
            else:
                self.page = "item"
        elif value in SUB_PAGES:
            self.page, self.sub_page = "sub", value
            self.visited.add((self.asin, value))
        elif value == BUY:
            product = self.product()
            price = self.shop.product_prices[self.asin]
            self.reward, self.reward_info = get_reward(product, self.goal, price=price, options=dict(self.options),
                                                       option_matching=self.option_matching, verbose=True)
            self.page = "done"
            purchased = {"asin": self.asin, "options": dict(self.options), "price": price}
            return self.observation(), float(self.reward), True, {"reward_info": self.reward_info,
                                                                  "purchased": purchased}
        return self.observation(), 0.0, False, {}


# --- the scripted expert -------------------------------------------------------------------------------------
OPENER_RE = re.compile(r"^(?:i need|i am looking for|i'm looking for|im looking for|i want to buy|i want|i would like|"
                       r"i'd like|find me|get me|show me|looking for|please find|search for)\s+")
PRICE_RE = re.compile(r",?\s*and price lower than [\d.]+ dollars")
QUERY_STOP = frozenset("a an the that is are be and or with in for of it to me my some which who this one also "
                       "size color colour scent flavor style please".split())


def instruction_core(instruction: str) -> str:
    """The instruction without its opener and price clause: 'a long clear glass jar'."""
    text = PRICE_RE.sub("", instruction.lower().strip().rstrip("."))
    return OPENER_RE.sub("", text).strip(" ,")


def query_from_text(text: str, max_words: int = 14) -> str:
    words = [w.strip(".,:;!?()\"'") for w in text.lower().split()]
    words = [w for w in words if w and w not in QUERY_STOP]
    return " ".join(list(dict.fromkeys(words))[:max_words])


class Expert:
    """Plays a session from the true goal: search, open the goal product (or one that scores 1), choose the goal
    options, buy. Every turn comes with a thought that says what it sees and why it acts."""

    def __init__(self, session: Session):
        self.s = session
        self._scores: dict[str, tuple[float, dict[str, str]]] = {}

    # what the goal asks for, in words
    def what(self) -> str:
        core = instruction_core(self.s.goal["instruction_text"])
        words = core.split()
        return core if len(words) <= 14 else " ".join(words[:14]) + " ..."

    def thing(self) -> str:
        q = str(self.s.goal.get("query", ""))
        return q if q and q in self.s.goal["instruction_text"].lower() else "item"

    def budget(self) -> str:
        upper = self.s.goal["price_upper"]
        return f" under ${upper:.2f}" if 0 < upper < 1000000 else ""

    def best_options(self, product: dict) -> dict[str, str]:
        """The option values that meet the goal options: exact values first, then WebShop's own matching."""
        goal_opts = self.s.goal["goal_options"]
        wanted = list(goal_opts.values()) if isinstance(goal_opts, dict) else list(goal_opts)
        chosen: dict[str, str] = {}
        if isinstance(goal_opts, dict):
            for name, value in goal_opts.items():
                if value in product["options"].get(name, []):
                    chosen[name] = value
                    wanted.remove(value)
        for g in list(wanted):
            g_low = str(g).lower()
            candidates = [(n, v) for n, vs in product["options"].items() if n not in chosen for v in vs]
            exact = [(n, v) for n, v in candidates if v == g_low]
            fuzzy = [(n, v) for n, v in candidates
                     if normalize_color(v) == normalize_color(g_low) or get_option_reward(
                         {"Title": "", "BulletPoints": [], "Description": ""}, [g_low], {n: v},
                         self.s.option_matching)[1] > 0]
            if exact or fuzzy:
                n, v = (exact or fuzzy)[0]
                chosen[n] = v
                wanted.remove(g)
        return chosen

    def score(self, asin: str) -> tuple[float, dict[str, str]]:
        """The reward this product would earn with its best options (the expert knows the goal)."""
        if asin not in self._scores:
            product = self.s.shop.product_item_dict[asin]
            options = self.best_options(product)
            reward = get_reward(product, self.s.goal, price=self.s.shop.product_prices[asin], options=options,
                                option_matching=self.s.option_matching)
            self._scores[asin] = (reward, options)
        return self._scores[asin]

    def target(self) -> str | None:
        """The goal product if it is on this page, else the first product here that scores 1, else the goal
        product or a product scoring 1 on another page of the results."""
        shown = self.s.page_results() if self.s.page == "results" else []
        for candidates in (shown, self.s.results):
            if self.s.goal["asin"] in candidates:
                return self.s.goal["asin"]
            found = next((a for a in candidates if self.score(a)[0] >= 1.0), None)
            if found is not None:
                return found
        return None

    def unseen_attribute(self) -> str | None:
        """A goal attribute the item's title does not show, when the expert wants to check the features for it
        (on about half the items, fixed per task and item, and once per item)."""
        s = self.s
        if (s.asin, "Features") in s.visited or int(stable_hash(s.goal["instruction_text"], s.asin), 16) % 2:
            return None
        title = s.product()["Title"].lower()
        return next((a for a in s.goal["attributes"] if a.lower() not in title), None)

    def next_query(self) -> str | None:
        """The instruction's key words, then the goal product's name; None once both were searched."""
        queries = [query_from_text(instruction_core(self.s.goal["instruction_text"])),
                   query_from_text(self.s.goal["name"], max_words=12)]
        return next((q for q in queries if q and q not in self.s.searches), None)

    def describe(self, asin: str) -> dict:
        p = self.s.shop.product_item_dict[asin]
        title_words = _clean(p["Title"]).split()
        return {"asin": asin, "title": " ".join(title_words[:8]) + (" ..." if len(title_words) > 8 else ""),
                "price": _clean(p["Price"]), "attrs": ", ".join(self.s.goal["attributes"][:3]),
                "budget": self.budget(), "thing": self.thing(), "what": self.what()}

    def turn(self, rng: random.Random) -> tuple[str, str]:
        """(thought, action); the thought is one line without brackets, since it is written inside think[...]."""
        thought, action = self._turn(rng)
        return " ".join(thought.replace("[", "(").replace("]", ")").split()), action

    def _turn(self, rng: random.Random) -> tuple[str, str]:
        s = self.s
        pick = rng.choice
        if s.page == "done":
            return "I have bought the item; the task is over.", "think[The purchase is done.]"
        if s.page == "search":
            query = self.next_query() or query_from_text(instruction_core(s.goal["instruction_text"]))
            if query == query_from_text(instruction_core(s.goal["instruction_text"])):
                thought = pick([
                    f"I need {self.what()}{self.budget()}. I'll search for it first.",
                    f"The instruction asks for {self.what()}; let me search with its key words.",
                    f"First I'll search the shop for {query}.",
                    f"Let me look up the {self.thing()} with the attributes I need: "
                    f"{', '.join(s.goal['attributes'][:3])}.",
                ])
            else:
                thought = pick([
                    f"The last search did not find a good match, so I'll search with more specific words: {query}.",
                    "Let me search again, this time with the words of the product name.",
                ])
            return thought, f"search[{query}]"
        if s.page == "sub":
            p = s.product()
            text = " ".join(p["BulletPoints"]).lower() if s.sub_page == "Features" else ""
            title = p["Title"].lower()
            seen = sorted((a for a in s.goal["attributes"] if a.lower() in text), key=lambda a: a.lower() in title)
            if seen:
                return pick([f"The features say it is {seen[0]}, so it fits. Back to the item.",
                             f"Good, '{seen[0]}' is listed here. Going back to the item page."]), f"click[{PREV_PAGE}]"
            return pick(["I have read enough here; back to the item page.",
                         "Nothing on this page changes my choice. Going back to the item."]), f"click[{PREV_PAGE}]"
        if s.page == "item":
            target = self.target() if s.results else None
            if s.asin == s.goal["asin"] or self.score(s.asin)[0] >= 1.0:
                target = s.asin  # this one will do: no need to go back for another
            if target is None and self.next_query() is not None:
                target = ""  # nothing found scores 1: go back and search again rather than settle
            if target is not None and s.asin != target:
                return pick([f"{s.asin} is not the {self.thing()} I want; I'll go back to the results.",
                             "This item does not match the instruction. Back to the results."]), f"click[{PREV_PAGE}]"
            attribute = self.unseen_attribute()
            if attribute is not None:
                return pick([f"The title does not mention {attribute}; let me check the features.",
                             f"I want to make sure this {self.thing()} is {attribute}. I'll look at the features.",
                             ]), "click[Features]"
            _, options = self.score(s.asin)
            missing = [(n, v) for n, v in options.items() if s.options.get(n) != v]
            if missing:
                name, value = missing[0]
                return pick([
                    f"I need to pick {name} '{value}' before buying.",
                    f"The instruction wants {value}, so I'll select it under {name}.",
                    f"This item comes in several {name} options; I'll choose '{value}'.",
                ]), f"click[{value}]"
            d = self.describe(s.asin)
            chosen = ", ".join(f"{v}" for v in options.values())
            if self.score(s.asin)[0] < 1.0:
                return pick([
                    f"This is the closest {self.thing()} I found, though it may not match everything. I'll buy it.",
                    f"No better match turned up; {s.asin} is the best option left, so I'll buy it.",
                ]), f"click[{BUY}]"
            chosen_text = f", {chosen}" if chosen else ""
            price_text = f", and {d['price']} is within the budget" if d["budget"] else ""
            return pick([
                f"Everything matches: {d['attrs']}{chosen_text}{price_text}. I'll buy it.",
                f"This {d['thing']} has what I need{' with ' + chosen + ' selected' if chosen else ''}. Time to buy it.",
                f"{s.asin} fits the instruction{d['budget'] and ' and its price is' + d['budget']}. Buy now.",
            ]), f"click[{BUY}]"
        # results page
        target = self.target()
        if target is not None:
            index = s.results.index(target)
            page = index // PRODUCT_WINDOW + 1
            if page == s.page_num:
                d = self.describe(target)
                ordinal = ORDINALS[index % PRODUCT_WINDOW]
                budget = d["budget"] and "," + d["budget"]
                return pick([
                    f"The {ordinal} result {target} is {d['title']} at {d['price']}; it looks like the {d['thing']} "
                    f"I need{budget}. I'll open it.",
                    f"{target} ({d['title']}) matches {d['attrs']} and costs {d['price']}. Let me check it.",
                    f"{target} looks right: {d['title']}, {d['price']}. I'll click it.",
                ]), f"click[{target}]"
            if page > s.page_num:
                return pick([
                    f"None of the results on page {s.page_num} is the {self.thing()} I need; I'll look at the next page.",
                    f"Page {s.page_num} has no {self.thing()} that fits. Next page.",
                ]), f"click[{NEXT_PAGE}]"
            return "The item I want was on an earlier page; going back.", f"click[{PREV_PAGE}]"
        if self.next_query() is not None:
            return pick([
                f"None of these {len(s.results)} results fits {self.what()}; I'll go back and search with "
                "different words.",
                f"No result here is the {self.thing()} I need. Back to search.",
            ]), f"click[{BACK_TO_SEARCH}]"
        shown = s.page_results()
        if not shown:
            return "This search found nothing; back to the search page.", f"click[{BACK_TO_SEARCH}]"
        best = max(shown, key=lambda a: (self.score(a)[0], -shown.index(a)))
        d = self.describe(best)
        return (f"No result matches everything; {best} ({d['title']}) is the closest, so I'll open it.",
                f"click[{best}]")


# --- the environment -----------------------------------------------------------------------------------------
class WebShopEnv(TextEnv):
    """WebShop's text shop over a generated catalog (data=None) or WebShop's real product files.

    option_matching: how the reward matches the chosen options to the goal's. "master" (the default): WebShop's
    master branch, as in the WebShop paper, AgentGym and published scores: each goal option is fuzzily matched
    (token_set_ratio > 85) against the chosen values. "v2": WebShop commit 6ba9969 (v2 line, never merged): each
    chosen option is matched, 'size' exactly, and a chosen value the product's text mentions counts too. Only
    for reproducing numbers measured with that rule."""

    env_name = "webshop"
    agent_format = "webshop"
    default_max_steps = 15  # as in ReAct's WebShop runs
    token_budget = (128, 48)  # expert, 300 train episodes, SmolLM2's tokenizer: thought max 71, action max 25

    def __init__(self, split: str = "train", data=None, seed: int = 0, num_products: int | None = None,
                 num_tasks: int | None = None, max_steps: int | None = None, render_mode: str | None = None,
                 option_matching: str = "master"):
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        self.option_matching = check_option_matching(option_matching)
        self.data, self.seed, self.num_products, self.num_tasks = data, int(seed), num_products, num_tasks
        self._shop: Shop | None = get_shop(data, self.seed, num_products)
        self._session: Session | None = None
        self._expert: Expert | None = None

    @property
    def shop(self) -> Shop:
        if self._shop is None:  # after close()
            self._shop = get_shop(self.data, self.seed, self.num_products)
        return self._shop

    def task_ids(self) -> list[str]:
        ids = self.shop.split_ids(self.split)
        return ids[: self.num_tasks] if self.num_tasks is not None else list(ids)

    def goal(self, task_id: str | None = None) -> dict:
        task_id = task_id or self.task_id
        if task_id not in self.shop.goals:
            raise ValueError(f"webshop: unknown task id {task_id!r} (ids look like {next(iter(self.shop.goals))!r})")
        return self.shop.goals[task_id]

    def _load_task(self, task_id: str) -> tuple[str, dict]:
        goal = self.goal(task_id)
        self._session = Session(self.shop, goal, self.option_matching)
        self._expert = Expert(self._session)
        return self._session.observation(), {"instruction": goal["instruction_text"], "score": 0.0,
                                             "page": "search"}

    def _apply(self, action: str) -> tuple[str, float, bool, dict]:
        s = self._session
        obs, reward, done, info = s.step(action)
        self._success = done and reward >= 1.0
        info.update(score=float(s.reward or 0.0), page=s.page)
        return obs, reward, done, info

    def admissible_actions(self) -> list[str] | None:
        return self._session.admissible() if self._session is not None else None

    def expert_turn(self) -> tuple[str, str]:
        if self._expert is None:
            raise RuntimeError("call reset() before expert_turn()")
        return self._expert.turn(random.Random(stable_hash(self.seed, self.task_id, self._steps)))

    # --- the ReAct prompt --------------------------------------------------------------------------------------
    def example(self, task_id: str) -> str:
        """One expert episode in the webshop agent format (the text of a few-shot example)."""
        cache, key = self.shop.examples, (task_id, self.max_steps, self.option_matching)
        if key not in cache:
            session = Session(self.shop, self.shop.goals[task_id], self.option_matching)
            expert = Expert(session)
            parts = [to_text(session.observation()) + "\n\n"]
            for step in range(self.max_steps):
                thought, action = expert.turn(random.Random(stable_hash(self.seed, task_id, step)))
                try:
                    obs, _, done, _ = session.step(action)
                except InvalidAction as err:
                    obs, done = f"Invalid action: {err}", False
                parts.append(f"Action: think[{thought}]\nObservation: OK.\n\nAction: {action}\n"
                             f"Observation: {to_text(obs)}\n\n")
                if done:
                    break
            cache[key] = to_text("".join(parts), max_chars=10 * OBS_MAX_CHARS)
        return cache[key]

    def prompt(self, observation: str, few_shot: int = 0) -> str:
        """'Webshop', `few_shot` solved train episodes, then this task's first observation."""
        if few_shot < 0:
            raise ValueError(f"few_shot must be >= 0, got {few_shot}")
        examples = []
        for task_id in self.shop.split_ids("train"):
            if len(examples) >= few_shot:
                break
            if task_id != self.task_id and self.example(task_id).rstrip().endswith("max 1.0): 1.0"):
                examples.append(self.example(task_id))
        return "Webshop\n" + "".join(examples) + observation + "\n\n"

    def close(self) -> None:
        self._session, self._expert, self._shop = None, None, None
