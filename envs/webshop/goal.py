"""WebShop's goals and reward, ported from princeton-nlp/WebShop `web_agent_site/engine/goal.py` and
`normalize.py` (MIT, Copyright (c) 2023 Princeton Natural Language Processing). Names, structure, thresholds and
arithmetic follow the original's master branch (goal.py as of master 64fa2a5c15c7daa698b9ac93f5bb5437b634c9bd,
blob 09ad26819db8b90ec09be24fa542c2fd387e725d; its reward functions are unchanged since the initial commit
61e56dbba107ae13ff49e6058d7d2aad23326929), the code of the WebShop paper, AgentGym and published agent scores.
What differs, and why:

* Option matching. master fuzzy-matches each goal option against the chosen option values
  (`get_option_reward_master`). Commit 6ba9969dbb8411c4dda34232caad8d1bd1383b69 ("Finer matching for options",
  on WebShop's v2 line of work, PR #4; never merged into master, and the v2 branch's head later reworked it
  again with dictionary synonyms) instead walks the chosen options: 'size' must equal a goal option exactly,
  others match fuzzily, and a chosen value found in the product's title, features or description counts even
  when the goal wants another (`get_option_reward_v2`, a port of exactly that commit). The two disagree on
  near-miss sizes ('x-large' for 'large'), on chosen values the title happens to mention, and on extra chosen
  options (v2 counts chosen options, so r_option can pass 1). master also hands a synthetic goal's options over
  as (name, value) pairs rather than values; that quirk is kept (see `get_option_reward_master`).
  `get_reward(..., option_matching="master")` is the default; option_matching="v2" (also
  `WebShopEnv(option_matching="v2")`) only reproduces numbers measured with the 6ba9969 rule.
* `token_set_ratio` is rapidfuzz's, wrapped the way thefuzz (>= 0.20, itself a thin layer over rapidfuzz) wraps
  it: the argument passed through str(), code points 128-255 dropped, lower-cased, non-alphanumerics to spaces,
  score rounded to an int. So the `> 85` thresholds see the same numbers as thefuzz >= 0.20. (WebShop's
  requirements pin thefuzz==0.19.0, which scores with difflib's SequenceMatcher unless python-Levenshtein is
  installed; that can move a score by a point or so on some strings.)
* The title-noun score of `get_type_reward` used spaCy part-of-speech tags (tokens tagged NOUN or PROPN) of
  `en_core_web_lg`, the model WebShop's setup.sh downloads (master's goal.py loads `en_core_web_sm` since
  d149d0d, May 2024). No spaCy model is available offline, so unless RAYSAD_WEBSHOP_SPACY names one,
  `title_nouns` uses a heuristic: lower-cased words of letters and digits (inner ' or - kept) that hold a
  letter and are not function words (articles, pronouns, prepositions, conjunctions, auxiliaries) or common
  descriptive adjectives/adverbs. spaCy tags most capitalised words of a product title as PROPN, so on
  Title-Case product names the two agree on most words; they differ on adjectives/verbs spaCy would drop that
  the list misses, and on punctuation splits. Set RAYSAD_WEBSHOP_SPACY=en_core_web_lg (or en_core_web_sm; with
  that model installed) to use spaCy exactly as the original does.
* The randomness of the original (`random.sample` for the price bound, `random.uniform` for prices) draws from a
  `random.Random` passed in, so goals are deterministic from the environment's seed.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
import re
from collections import defaultdict

from rapidfuzz import fuzz
from rapidfuzz.utils import default_process

EXACT_MATCH_OPTS = ["size"]  # v2 only
OPTION_MATCHING = ("master", "v2")  # the option rule of get_reward: WebShop's master branch, or its v2 branch
PRICE_RANGE = [10.0 * i for i in range(1, 100)]

# web_agent_site/engine/normalize.py: an option value counts as the first of these colours it contains.
COLOR_SET = [
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite",
    "grass", "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon",
    "leopard", "light", "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha",
    "multicolor", "mushroom", "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter",
    "pink", "plum", "purple", "rainbow", "red", "rose", "royal", "rust", "sand", "sapphire", "seashell",
    "silver", "skull", "slate", "steel", "stone", "stonewash", "sunflower", "tan", "taupe", "teal", "tiger",
    "turquoise", "violet", "walnut", "wheat", "white", "wine", "yellow",
]


_LATIN1 = {i: None for i in range(128, 256)}


def token_set_ratio(s1: str, s2: str) -> int:
    """thefuzz.fuzz.token_set_ratio (full_process=True, force_ascii=True) on top of rapidfuzz."""
    s1, s2 = default_process(str(s1).translate(_LATIN1)), default_process(str(s2).translate(_LATIN1))
    return int(round(fuzz.token_set_ratio(s1, s2)))


def normalize_color(color_string):
    """The first colour of COLOR_SET found in the string (substring match, as in the original), else the string.
    master also hands it (option name, value) tuples (see get_option_reward): `in` then tests the tuple's items
    for equality, so ('color', 'red') -> 'red' but ('color', 'navy blue') stays a tuple."""
    for norm_color in COLOR_SET:
        if norm_color in color_string:
            return norm_color
    return color_string


# --- the title-noun heuristic (stands in for spaCy's NOUN/PROPN tags) ---------------------------------------
_NON_NOUNS = frozenset("""
a an the this that these those some any each every all both either neither no another such
i me my mine we us our you your he him his she her it its they them their who whom whose which what
and or but nor so yet if then than as because while though although whether
of in on at by for with without from to into onto upon over under above below between among through during
before after about against along around across behind beyond near off out up down per via plus x vs
is are was were be been being am do does did has have had will would can could should may might must shall
not very too also just only more most less least much many few lot lots
new best great good premium high low large small big little long short extra super ultra mini
easy quick fast slow free ready perfect ideal professional portable adjustable durable comfortable
soft hard heavy light lightweight strong full half multi universal compatible original classic modern
""".split())
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def _heuristic_nouns(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if any(c.isalpha() for c in w) and w not in _NON_NOUNS]


@functools.lru_cache(maxsize=1)
def _spacy_nlp(model: str):
    import spacy  # only when RAYSAD_WEBSHOP_SPACY names an installed model

    return spacy.load(model)


@functools.lru_cache(maxsize=65536)
def title_nouns(text: str) -> tuple[str, ...]:
    """The lower-cased noun tokens of a product name, duplicates kept (the original divides by the list length)."""
    model = os.environ.get("RAYSAD_WEBSHOP_SPACY")
    if model:
        return tuple(t.text.lower() for t in _spacy_nlp(model)(text) if t.pos_ in ("PNOUN", "NOUN", "PROPN"))
    return tuple(_heuristic_nouns(text))


# --- goals ------------------------------------------------------------------------------------------------------
def price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    """The goal's price_upper and its instruction text, as WebShop draws them: two of the next four multiples of
    10 above the price, keep the larger; no bound (1e6, no text) when fewer than two are left (price >= 980)."""
    price_range = [p for p in PRICE_RANGE if p > price][:4]
    if len(price_range) >= 2:
        _, price_upper = sorted(rng.sample(price_range, 2))
        return price_upper, f", and price lower than {price_upper:.2f} dollars"
    return 1000000, ""


def get_human_goals(all_products: list[dict], product_prices: dict[str, float], rng: random.Random) -> list[dict]:
    """One goal per human instruction (items_human_ins.json, attached to products as 'instructions') that names
    at least one attribute; goal_options is the list of instruction_options."""
    goals = []
    for item in all_products:
        asin = item["asin"]
        if "instructions" not in item:
            continue
        for product in item["instructions"]:
            attributes = product["instruction_attributes"]
            if len(attributes) == 0:
                continue
            price_upper, price_text = price_bound(product_prices[asin], rng)
            goals.append({
                "asin": asin,
                "category": item["category"],
                "query": item["query"],
                "name": item["name"],
                "product_category": item["product_category"],
                "instruction_text": product["instruction"].strip(".") + price_text,
                "attributes": attributes,
                "price_upper": price_upper,
                "goal_options": product["instruction_options"],
                "weight": 1,
            })
    return goals


def get_synthetic_goals(all_products: list[dict], product_prices: dict[str, float], rng: random.Random) -> list[dict]:
    """One goal per option combination of every product with an instruction (items_ins_v2.json); goal_options is
    a dict option name -> value, spelled into the instruction as ' with color: red, and size: large'."""
    goals = []
    cnt_atts: dict[str, int] = defaultdict(int)
    for product in all_products:
        if product.get("instruction_text") is None:
            continue
        asin = product["asin"]
        attributes = product["instruction_attributes"]
        assert len(attributes) > 0, f"{asin}: an instruction without instruction_attributes"
        price_upper, price_text = price_bound(product_prices[asin], rng)
        instruction_text = product["instruction_text"]
        options = product["options"]
        option_names = sorted(options)
        for combination in itertools.product(*(options[name] for name in option_names)):
            goal_options = dict(zip(option_names, combination))
            option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
            option_text = " with " + option_text if option_text else ""
            goals.append({
                "asin": asin,
                "category": product["category"],
                "query": product["query"],
                "name": product["Title"],
                "product_category": product["product_category"],
                "instruction_text": f"{instruction_text}{option_text}{price_text}",
                "attributes": attributes,
                "price_upper": price_upper,
                "goal_options": goal_options,
            })
            for att in attributes:
                cnt_atts[att] += 1
    for goal in goals:
        goal["weight"] = sum(1.0 / cnt_atts[att] for att in goal["attributes"]) / len(goal["attributes"])
    return goals


# --- reward -----------------------------------------------------------------------------------------------------
def get_type_reward(purchased_product: dict, goal: dict) -> dict:
    """Whether the purchased product is the same kind of thing: same search query, >= 2 shared category levels,
    or enough shared title nouns. r_type is 1, 0.5 (none of the three), 0.1 (title_score < 0.1) or 0."""
    query_match = purchased_product["query"] == goal["query"]

    purchased_product_category = [x.strip() for x in purchased_product["product_category"].split("›")]
    goal_product_category = [x.strip() for x in goal["product_category"].split("›")]
    category_match = len(set(purchased_product_category) & set(goal_product_category)) >= 2

    purchased_type_parse = title_nouns(purchased_product["name"])
    desired_type_parse = title_nouns(goal["name"])
    n_intersect_type = len(set(purchased_type_parse) & set(desired_type_parse))
    if len(desired_type_parse) == 0:
        title_score = 0.2
    else:
        title_score = n_intersect_type / len(desired_type_parse)

    r_type = 1.0
    match = query_match or category_match or title_score > 0.2
    if not match:
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return dict(r_type=r_type, query_match=query_match, category_match=category_match, title_score=title_score)


def get_attribute_reward(purchased_product: dict, goal: dict) -> tuple[float, int]:
    """How many goal attributes the product has: fuzzy (token_set_ratio > 85) against its attribute list, else
    as a substring of its title, features (bullet points) or description."""
    purchased_attrs = purchased_product["Attributes"]
    goal_attrs = goal["attributes"]
    num_attr_matches = 0
    for g_attr in goal_attrs:
        matched = False
        for p_attr in purchased_attrs:
            if token_set_ratio(p_attr, g_attr) > 85:
                num_attr_matches += 1
                matched = True
                break
        if not matched and (
            g_attr in purchased_product["Title"].lower()
            or g_attr in " ".join(purchased_product["BulletPoints"]).lower()
            or g_attr in purchased_product["Description"].lower()
        ):
            num_attr_matches += 1
    r_attr = num_attr_matches / len(goal_attrs)
    return r_attr, num_attr_matches


def check_option_matching(option_matching: str) -> str:
    if option_matching not in OPTION_MATCHING:
        raise ValueError(f"option_matching must be one of {OPTION_MATCHING}, got {option_matching!r}")
    return option_matching


def get_option_reward_master(purchased_options, goal_options) -> tuple[float | None, int]:
    """WebShop master's option reward: how many goal options some chosen option value matches (after colour
    normalisation, token_set_ratio > 85); one chosen value may satisfy several goal options. A line-for-line port
    of master's function (64fa2a5, web_agent_site/engine/goal.py lines 209-225; the same in 61e56db):

        def get_option_reward(purchased_options, goal_options):
            \"\"\"Calculate reward for purchased product's options w.r.t. goal options\"\"\"
            purchased_options = [normalize_color(o) for o in purchased_options]
            goal_options = [normalize_color(o) for o in goal_options]

            # Perform fuzzy matching of each purchased option against each goal option
            num_option_matches = 0
            for g_option in goal_options:
                for p_option in purchased_options:
                    score = fuzz.token_set_ratio(p_option, g_option)
                    if score > 85:
                        num_option_matches += 1
                        break

            # Calculate option reward as fraction of goal options hit
            r_option = num_option_matches / len(goal_options) if len(goal_options) > 0 else None
            return r_option, num_option_matches

    master's get_reward calls it as `get_option_reward(list(options.values()), goal['goal_options'].items() if
    isinstance(goal['goal_options'], dict) else goal['goal_options'])`: human goals pass their list of option
    values, synthetic (dict) goals their (name, value) pairs, which thefuzz scores as str(pair), e.g.
    "('size', 'large')" -> "size large". That is kept on purpose: WebShop's text env (WebAgentTextEnv, as AgentGym
    builds it) loads synthetic goals unless human_goals is set, so published text-env scores went through it. It
    makes sizes stricter ('x-large' no longer meets ('size', 'large'): 83) and leaves some exact purchases short
    of 1: the chosen 'sunflowers' normalises to 'sunflower', which shares no token with "color sunflowers" (72)."""
    purchased_options = [normalize_color(o) for o in purchased_options]
    goal_options = [normalize_color(o) for o in goal_options]
    num_option_matches = 0
    for g_option in goal_options:
        for p_option in purchased_options:
            if token_set_ratio(p_option, g_option) > 85:
                num_option_matches += 1
                break
    r_option = num_option_matches / len(goal_options) if len(goal_options) > 0 else None
    return r_option, num_option_matches


def get_option_reward_v2(purchased_product: dict, goal_options: list[str], purchased_options: dict[str, str]
                         ) -> tuple[float | None, int]:
    """The option reward of WebShop commit 6ba9969 ("Finer matching for options", goal.py get_option_reward; v2
    line of work, not on master): how many *chosen* options match a goal option (after colour normalisation):
    'size' exactly, others fuzzily (token_set_ratio > 85), else as a substring of the title, features or
    description. Choosing extra options the title mentions can push the count past len(goal_options)."""
    purchased_options = {k: normalize_color(v) for k, v in purchased_options.items()}
    goal_options = [normalize_color(o) for o in goal_options]
    num_option_matches = 0
    for p_option_k, p_option_v in purchased_options.items():
        matched = False
        if p_option_k.lower() in EXACT_MATCH_OPTS:
            if p_option_v in goal_options:
                num_option_matches += 1
                matched = True
        else:
            for g_option in goal_options:
                if token_set_ratio(g_option, p_option_v) > 85:
                    num_option_matches += 1
                    matched = True
                    break
        if not matched and (
            p_option_v in purchased_product["Title"].lower()
            or p_option_v in " ".join(purchased_product["BulletPoints"]).lower()
            or p_option_v in purchased_product["Description"].lower()
        ):
            num_option_matches += 1
    r_option = num_option_matches / len(goal_options) if len(goal_options) > 0 else None
    return r_option, num_option_matches


def get_option_reward(purchased_product: dict, goal_options: dict[str, str] | list[str],
                      purchased_options: dict[str, str], option_matching: str = "master"
                      ) -> tuple[float | None, int]:
    """(r_option, matched count) of the chosen options {name: value} against a goal's options (a human goal's
    list of values, or a synthetic goal's dict name -> value), by WebShop master's rule (the default) or its v2
    rule; the goal's options are handed over as the get_reward of that branch hands them (master: a dict's
    (name, value) pairs, v2: its values). purchased_product is only read by v2 (title, features, description)."""
    if check_option_matching(option_matching) == "v2":
        values = list(goal_options.values()) if isinstance(goal_options, dict) else list(goal_options)
        return get_option_reward_v2(purchased_product, values, purchased_options)
    pairs_or_values = goal_options.items() if isinstance(goal_options, dict) else goal_options
    return get_option_reward_master(list(purchased_options.values()), pairs_or_values)


def get_reward(purchased_product: dict, goal: dict, price: float, options: dict[str, str],
               option_matching: str = "master", **kwargs):
    """WebShop's score of a purchase:
        (matched attributes + matched options + price ok) / (goal attributes + goal options + 1) * r_type.
    Options are matched by WebShop master's rule, or with option_matching="v2" by its v2 branch's (see
    get_option_reward); the rest is the same on both branches. With verbose=True also returns the parts (r_type,
    r_att, r_option, r_price, weights, match flags)."""
    r_type_dict = get_type_reward(purchased_product, goal)
    r_price = (price <= goal["price_upper"]) if goal["price_upper"] > 0 else None
    r_att, num_attr_matches = get_attribute_reward(purchased_product, goal)
    goal_options = goal["goal_options"]
    r_option, num_option_matches = get_option_reward(purchased_product, goal_options, options, option_matching)
    denominator = len(goal["attributes"]) + len(goal_options) + 1
    total_reward = (num_attr_matches + num_option_matches + r_price) / denominator
    total_reward *= r_type_dict["r_type"]
    if kwargs.get("verbose", False):
        info = {
            "r_type": r_type_dict["r_type"],
            "r_att": r_att,
            "w_att": len(goal["attributes"]) / denominator,
            "query_match": r_type_dict["query_match"],
            "category_match": r_type_dict["category_match"],
            "title_score": r_type_dict["title_score"],
        }
        if r_option is not None:
            info["r_option"] = r_option
            info["w_option"] = len(goal_options) / denominator
        if r_price is not None:
            info["r_price"] = r_price
            info["w_price"] = 1 / denominator
        return total_reward, info
    return total_reward
