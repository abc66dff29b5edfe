"""The scripted HotPotQA expert: ReAct thoughts and actions that only name what the episode has shown.

The expert knows the true question structure (the task's hops: which page states which needed fact), and it
uses that knowledge to *choose* what to do. What it *writes* is held to one rule:

    Experts only know what they have seen. A thought or a Search/Lookup argument names an entity (a page
    title, a person, a film, a year ...) only once the question or an earlier observation of the episode
    has shown it.

So a bridge question starts with a search for an entity the question names, and the bridge entity (the
second-hop page) is named and searched only after an observation has shown it. A page is searched under a
name the episode has shown that finds it: its title, or the title without a "(...)" qualifier or a leading
article when that alone finds the page ("Romeo and Juliet" for "Romeo and Juliet (1968 film)").

When no observation so far names the page of a fact still needed (in HotpotQA the bridge entity is often not in
the first fact's sentence, or is named differently, e.g. "SAS" for "Special Air Service"), the expert finds it in
one of two honest ways, tried in this order; its knowledge only picks the one that works, the text it writes
uses words already shown:
  1. "lookup_name": Lookup[word] on the current page with a content word of the question, when the next
     sentence it returns names the needed page;
  2. "query": Search[phrase] with words already shown (most natural first: a quoted or capitalised phrase of
     the question, the rest of the question once the names already searched are taken out, a capitalised
     phrase of a page read, ...; see `_Episode.queries`), when its result, a first paragraph or the
     "Similar: [...]" list, names the needed page. The page is then searched by the name the result showed.
Lookup keywords follow the same rule: a word already shown, or a plain lower-case word that is not part of the
answer ("born", "directed"), never an unseen name, number or answer word. The final answer is the gold answer,
given only once every supporting fact has been read.

If no honest way reaches a needed fact within the step budget, the expert gives up honestly: it says that it
could not find what it needs and answers Finish[unknown] (move "give_up"; the episode scores 0). It never
answers, or searches, with a name nobody showed it; a weaker but truthful episode is preferred to a lucky guess.

Counts (every record of the 100-record real sample, /work/shared/data/real/hotpotqa): 35 of 73 bridge
questions take "query" steps (46 in all; no comparison question does), none "lookup_name", none gives up, all
100 are solved. On the generated world every bridge entity is named by the first fact, so no such step occurs
and the episodes are exactly those of the earlier expert.

`expert_turn(env)` returns (thought, action) and sets `env.expert_move` to the kind of move: "search",
"lookup", "query", "lookup_name", "finish" or "give_up". It depends only on the episode so far, so asking
twice before a step gives the same turn.
"""
from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from ..core import stable_hash, to_text
from .corpus import Page
from .data import _STOP, _WORD, Hop
from .metrics import normalize_answer

if TYPE_CHECKING:
    from .env import HotPotQAEnv

GIVE_UP_ANSWER = "unknown"

_PLAN = {
    "bridge": ["I need to search {t0}, find {g0}, then find {g1}.",
               "To answer this, I first need {g0}, then {g1}. Let me search {t0}.",
               "The question needs two facts: {g0}, and then {g1}. I will start by searching {t0}."],
    "comparison": ["I need to search {t0} and {t1}, find {g0} and {g1}, then compare.",
                   "I need to find {g0} and {g1}. Let me search {t0} first.",
                   "To compare them I should search both {t0} and {t1}. I will start with {t0}."],
    "other": ["I need to search {titles}, and find the facts the question asks about.",
              "Let me start by searching {t0}.",
              "The answer should follow from {titles}. I will search {t0} first."],
    "query": ["The question does not name a page I can go to directly. Let me search {q} and see what comes up.",
              "I do not know yet which pages hold the facts I need. I will start by searching {q}."],
}
_NEXT_PAGE = ["{fact}. I need to search {t} and find {aim}.",
              "{fact}. Next, I need to search {t} to find {aim}.",
              "So {inner}. Now let me search {t} and find {aim}.",
              "The observation says {inner}. Now I need to find {aim}, so I will search {t}."]
_SIMILAR = ["The search suggests {t}, which looks like the page I need. Let me search {t}.",
            "{t} is among the similar pages. I will search {t} to find {aim}."]
_MENTIONED = ["The observation mentions {t}. Let me search {t} to find {aim}.",
              "This names {t}, so I will search {t} and find {aim}."]
_RECOVER = ["I still need to find {goal}. Let me search {t}.", "I have not found {goal} yet, so I will search {t}."]
_QUERY = ["None of the pages I have seen names the page I need next. Let me search {q} and see what comes up.",
          "I do not know yet which page has {aim}. I will search {q}."]
_LOOKUP_NAME = ["I do not know yet which page to read next. Let me look up {kw} on this page.",
                "This paragraph does not say where to go next. I will look up {kw}."]
_LOOKUP = ["The first paragraph does not tell me {aim}. Let me look up {kw}.",
           "{t} is the right page, but this paragraph does not tell me {aim}. I will look up {kw}.",
           "I need to know {aim}, which this paragraph does not give. Let me look up {kw}."]
_LOOKUP_SAME_PAGE = ["{fact}. I also need to find {aim} on this page. Let me look up {kw}.",
                     "{fact}. This page should also tell me {aim}, so I will look up {kw}."]
_LOOKUP_AGAIN = ["That sentence does not tell me {aim}. Let me look up {kw} again.",
                 "Not what I need yet. I will look for the next sentence with {kw}."]
_GIVE_UP = ["I could not find {aim} in anything I have read, so I cannot answer this reliably.",
            "Nothing I have seen tells me {aim}, and I have no good way left to find it. I cannot answer."]
_LEADING_WORDS = frozenset("He She It They His Her Its Their".split())  # not "The": titles start with it
_FINISH = ["{fact}. So the answer is {answer}.", "From these facts, the answer is {answer}.",
           "So the answer is {answer}."]
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)\s*$")
_ARTICLE = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)
_QUOTED = re.compile(r'"([^"]{2,80})"')
# a run of capitalised words, allowing short lower-case joiners inside ("Order of Merit of the Italian Republic")
_CAPITALISED = re.compile(r"[A-Z][\w'.-]*(?:\s+(?:(?:of|the|and|de|von|van|for|in|on|a)\s+)*[A-Z0-9][\w'.-]*)*")


_QUERY_STOP = _STOP | frozenset("what which who whom whose when where why how did does do name named this these "
                                "those there here has have had not same both other".split())
_LEADING = frozenset("the a an at in on of and for it he she they his her its their this that these what which who "
                     "when where how why while after before during".split())
_MAX_QUERIES = 60  # each is a bm25 query when simulated: bound the cost of one expert turn
_MAX_QUERY_WORDS = 10  # a Search stays short (the env's action token budget); content words go 6 at a time


def _chunks(words: list[str], size: int = 6, stride: int = 3) -> list[str]:
    """Runs of `size` consecutive words (overlapping by size - stride), or all of them when few."""
    if len(words) <= size:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + size]) for i in range(0, len(words) - size + stride, stride)]


def _phrases(text: str) -> list[str]:
    """Capitalised phrases of `text`, cut at sentence ends ("66ers. At Oklahoma" -> two phrases)."""
    return [part for phrase in _CAPITALISED.findall(text) for part in re.split(r"(?<=[a-z0-9]{2})\.\s+", phrase)]


def _clean(phrase: str) -> str:
    """A phrase without surrounding punctuation or leading function words ("The a German" -> "German")."""
    words = " ".join(phrase.strip(" .,;:'\"?!").split()).split(" ")
    while words and words[0].lower() in _LEADING:
        words = words[1:]
    return " ".join(words).strip(" .,;:'\"?!")


def _inner(fact: str) -> str:
    """A fact placed inside a sentence: "He won ..." -> "he won ..." (names stay capitalised)."""
    first, _, rest = fact.partition(" ")
    return f"{first.lower()} {rest}" if first in _LEADING_WORDS else fact


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def mentions(text: str, name: str) -> bool:
    """`name` occurs in `text` as whole words (case and spacing ignored)."""
    name = _norm(name)
    if not name:
        return False
    return re.search(r"(?<![a-z0-9])" + re.escape(name) + r"(?![a-z0-9])", _norm(text)) is not None


class _Episode:
    """What the expert may use this turn: the env, the task, and the text the episode has shown."""

    def __init__(self, env: "HotPotQAEnv"):
        self.env = env
        self.task = env.task
        self.corpus = env.dataset.corpus
        self.known = "\n".join([self.task.question, *env._observed])
        self.answer = " ".join(to_text(self.task.answer).split())
        self.answer_words = set(normalize_answer(self.answer).split())
        self.steps_left = env.max_steps - env._steps

    # --- names ---------------------------------------------------------------------------------------------
    def name_for(self, title: str, known: str | None = None) -> str | None:
        """A name of page `title` that the shown text contains and that Search finds the page by, or None."""
        known = self.known if known is None else known
        page = self.corpus.by_title.get(title)
        base = _PARENTHETICAL.sub("", title)
        for name in dict.fromkeys((title, base, _ARTICLE.sub("", title), _ARTICLE.sub("", base))):
            if len(name) >= 2 and mentions(known, name) and self.corpus.find(name) is page:
                return self._as_shown(name, known)
        return None

    @staticmethod
    def _as_shown(name: str, known: str) -> str:
        """`name` spelt as the shown text spells it (case and spacing)."""
        pattern = r"(?<![A-Za-z0-9])" + r"\s+".join(map(re.escape, name.split())) + r"(?![A-Za-z0-9])"
        found = re.search(pattern, known, re.IGNORECASE)
        return found.group(0) if found else name

    def may_look_up(self, word: str) -> bool:
        """A Lookup keyword must be seen already, or a plain lower-case word that is not part of the answer."""
        if mentions(self.known, word):
            return True
        return word.isalpha() and word.islower() and word.lower() not in self.answer_words

    def keyword(self, hop: Hop, page: Page) -> tuple[str, int] | None:
        """(keyword, hits before the evidence) for reading `hop` on `page` by Lookup, or None."""
        best, best_rank = None, None
        words = [hop.keyword] + list(dict.fromkeys(_WORD.findall(hop.evidence)))
        for i, word in enumerate(words):
            if (i and (len(word) < 3 or word.lower() in _STOP)) or not self.may_look_up(word):
                continue
            hits = page.lookup(word)
            if hop.evidence not in hits:
                continue
            rank = (hits.index(hop.evidence), i > 0, -len(word))  # fewest steps, then the hop's own keyword
            if best_rank is None or rank < best_rank:
                best, best_rank = word, rank
        return (best, best_rank[0]) if best is not None else None

    def read(self, hop: Hop) -> bool:
        return hop.evidence in self.env._seen.get(hop.title, "")

    def readable(self, hop: Hop) -> bool:
        """Search shows the hop's fact, or an honest Lookup on its page reaches it."""
        page = self.corpus.by_title.get(hop.title)
        return page is not None and (hop.evidence in page.first_paragraph() or self.keyword(hop, page) is not None)

    def shown_only(self, text: str) -> bool:
        """`text` names no page of the task that the episode has not shown."""
        return not any(mentions(text, name) and not mentions(self.known, name)
                       for h in self.task.hops for name in (h.title, _PARENTHETICAL.sub("", h.title)))

    def searched(self, query: str) -> bool:
        return " ".join(query.lower().split()) in self.env._searched

    # --- honest ways to a page no observation names -------------------------------------------------------
    def reveals(self, text: str, hops: list[Hop]) -> Hop | None:
        """The first hop of `hops` whose page `text` (a would-be observation) makes nameable."""
        known = self.known + "\n" + text
        return next((h for h in hops if self.name_for(h.title, known) is not None), None)

    def queries(self) -> list[str]:
        """Search phrases made only of shown words, the most natural first: the question's quoted and
        capitalised phrases of several words, the rest of the question once the names already searched are
        taken out, its one-word capitalised phrases, the capitalised phrases of the facts read, the current
        page's name with a content word of the question, words of the facts read, the whole question."""
        question = self.task.question
        seen = list(self.env._seen.values())
        content = [w for w in _WORD.findall(question) if w.lower() not in _QUERY_STOP and len(w) > 2]
        searched = " ".join(self.env._found_as.values())
        rest = [w for w in content if not mentions(searched, w)]
        asked = [_clean(p) for p in _QUOTED.findall(question) + _phrases(question)]
        read = [_clean(p) for text in seen for p in _phrases(text)]
        current = self.env._found_as.get(self.env._page.title) if self.env._page is not None else None
        combined = [f"{current} {w}" for w in content if not mentions(current, w)] if current else []
        words = [w for text in seen for w in _WORD.findall(text)
                 if w.islower() and len(w) > 3 and w not in _QUERY_STOP]
        tiers = ([p for p in asked if " " in p], _chunks(rest) if rest != content else [],
                 [p for p in asked if " " not in p],
                 sorted((p for p in read if " " in p), key=lambda p: -len(p.split())),
                 [p for p in read if " " not in p], combined, words, _chunks(content))
        out: list[str] = []
        for phrase in (p for tier in tiers for p in tier):
            if len(phrase) > 2 and len(phrase.split()) <= _MAX_QUERY_WORDS and phrase.lower() not in _QUERY_STOP \
                    and not self.searched(phrase) and phrase not in out:
                out.append(phrase)
        return out[:_MAX_QUERIES]

    def way_to(self, hops: list[Hop]) -> tuple[str, str, Hop] | None:
        """("lookup_name", keyword, hop) or ("query", phrase, hop): one step that shows a name of a needed page."""
        page = self.env._page
        if page is not None:
            for word in dict.fromkeys(_WORD.findall(self.task.question)):
                if len(word) < 3 or word.lower() in _STOP or not self.may_look_up(word):
                    continue
                hits = page.lookup(word)
                if self.env._lookup_key == word.lower():
                    hits = hits[self.env._lookup_next:]
                if hits:
                    hop = self.reveals(hits[0], hops)
                    if hop is not None and hits[0] not in self.env._seen.get(page.title, ""):
                        return "lookup_name", word, hop
        for phrase in self.queries():
            found = self.corpus.find(phrase)
            shown = found.first_paragraph() if found is not None else repr(self.corpus.similar(phrase))
            hop = self.reveals(shown, hops)
            if hop is not None:
                return "query", phrase, hop
        return None


def expert_turn(env: "HotPotQAEnv") -> tuple[str, str]:
    """The expert's (thought, action); sets env.expert_move. See the module docstring for the rule it keeps."""
    ep = _Episode(env)
    task = ep.task
    rng = random.Random(stable_hash("expert", env.seed, env.task_id, env._steps))
    hops = task.hops
    unread = [h for h in hops if not ep.read(h)]
    if not unread:
        last_fact = hops[-1].fact if hops else ""
        options = task.conclusions or [t for t in _FINISH if last_fact or "{fact}" not in t]
        env.expert_move = "finish"
        return rng.choice(options).format(fact=last_fact, answer=ep.answer), f"Finish[{ep.answer}]"
    readable = [h for h in unread if ep.readable(h)]
    if not readable or ep.steps_left <= 1:
        return _give_up(env, rng, unread)
    page = env._page
    just = [h for h in hops if ep.read(h) and h.evidence in env._last_obs]
    previous = just[-1] if just else None

    # 1. a needed fact on the current page: read it by Lookup
    for hop in (h for h in readable if page is not None and h.title == page.title):
        found = ep.keyword(hop, page)
        if found is None:
            continue
        kw, rank = found
        name = env._found_as.get(page.title, page.title)
        if env._lookup_key == kw.lower() and env._lookup_next > rank:  # walked past it: open the page again
            env.expert_move = "search"
            return rng.choice(_RECOVER).format(goal=hop.aim, t=name), f"Search[{name}]"
        if env._last_action == ("lookup", kw.lower()):
            thought = rng.choice(_LOOKUP_AGAIN).format(aim=hop.aim, kw=kw)
        elif previous is not None:
            thought = rng.choice(_LOOKUP_SAME_PAGE).format(fact=previous.fact, aim=hop.aim, kw=kw)
        else:
            thought = rng.choice(_LOOKUP).format(t=name, aim=hop.aim, kw=kw)
        env.expert_move = "lookup"
        return thought, f"Lookup[{kw}]"

    # 2. a needed page the episode has named: search it by that name
    elsewhere = [h for h in readable if page is None or h.title != page.title]
    for hop in elsewhere:
        name = ep.name_for(hop.title)
        if name is None:
            continue
        if env._steps == 0:
            thought = _plan(ep, rng, name)
        elif previous is not None:
            thought = rng.choice(_NEXT_PAGE).format(fact=previous.fact, inner=_inner(previous.fact), t=name,
                                                    aim=hop.aim)
        elif env._last_action and env._last_action[0] == "search" and env._last_obs.startswith("Could not find") \
                and mentions(env._last_obs, name):
            thought = rng.choice(_SIMILAR).format(t=name, aim=hop.aim)
        elif env._last_action and mentions(env._last_obs, name):
            thought = rng.choice(_MENTIONED).format(t=name, aim=hop.aim)
        else:
            thought = rng.choice(_RECOVER).format(goal=hop.goal.replace(hop.title, name), t=name)
        env.expert_move = "search"
        return thought, f"Search[{name}]"

    # 3. no observation names a needed page yet: a lookup or a search that will show its name
    way = ep.way_to(elsewhere) if ep.steps_left >= 3 else None  # this step, the search it enables, a Finish
    if way is None:
        return _give_up(env, rng, unread)
    move, arg, hop = way
    env.expert_move = move
    if move == "lookup_name":
        return rng.choice(_LOOKUP_NAME).format(kw=arg), f"Lookup[{arg}]"
    if env._steps == 0:
        return rng.choice(_PLAN["query"]).format(q=arg), f"Search[{arg}]"
    return rng.choice(_QUERY).format(q=arg, aim=hop.aim), f"Search[{arg}]"


def _give_up(env, rng: random.Random, unread: list[Hop]) -> tuple[str, str]:
    env.expert_move = "give_up"
    aim = unread[0].aim if unread else "the fact I need"
    return rng.choice(_GIVE_UP).format(aim=aim), f"Finish[{GIVE_UP_ANSWER}]"


def _plan(ep: _Episode, rng: random.Random, first: str) -> str:
    """The first thought: the plan, naming only pages the question names (`first` is searched now)."""
    task = ep.task
    names = [first] + [n for n in dict.fromkeys(ep.name_for(h.title) for h in task.hops) if n and n != first]
    goals = [h.goal for h in task.hops] + ["", ""]
    kind = task.kind if task.conclusions and len(task.hops) == 2 else "other"
    if kind == "bridge" and not all(ep.shown_only(g) for g in goals):
        kind = "other"
    if kind == "comparison" and (len(names) < 2 or not all(ep.shown_only(g) for g in goals)):
        kind = "other"
    return rng.choice(_PLAN[kind]).format(titles=_join(names), t0=first, t1=names[-1], g0=goals[0], g1=goals[1])
