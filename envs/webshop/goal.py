"""WebShop's goals and reward, ported from princeton-nlp/WebShop `web_agent_site/engine/goal.py` and
`normalize.py` (MIT, Copyright (c) 2023 Princeton Natural Language Processing). Names, structure, thresholds and
arithmetic follow the original; what differs, and why:

* `token_set_ratio` is rapidfuzz's, wrapped the way thefuzz (>= 0.20, itself a thin layer over rapidfuzz) wraps
  it: code points 128-255 dropped, lower-cased, non-alphanumerics to spaces, score rounded to an int. So the
  `> 85` thresholds see the same numbers as the original.
* The title-noun score of `get_type_reward` used spaCy `en_core_web_lg` part-of-speech tags (tokens tagged NOUN or
  PROPN). That model is not available offline, so `title_nouns` uses a heuristic: lower-cased alphanumeric words
  that hold a letter and are not function words (articles, pronouns, prepositions, conjunctions, auxiliaries) or
  common descriptive adjectives/adverbs. spaCy tags most capitalised words of a product title as PROPN, so on
  Title-Case product names the two agree on most words; they differ on adjectives/verbs spaCy would drop that the
  list misses, and on punctuation splits. Set RAYSAD_WEBSHOP_SPACY=en_core_web_lg (with that model installed)
  to use spaCy exactly as the original does.
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

EXACT_MATCH_OPTS = ["size"]
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


def normalize_color(color_string: str) -> str:
    """The first colour of COLOR_SET found in the string (substring match, as in the original), else the string."""
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


def get_option_reward(purchased_product: dict, goal_options: list[str], purchased_options: dict[str, str]
                      ) -> tuple[float | None, int]:
    """How many chosen options match a goal option (after colour normalisation): 'size' exactly, others fuzzily
    (token_set_ratio > 85), else as a substring of the title, features or description. As in the original the
    count runs over the *chosen* options, so choosing extra matching options can push it past len(goal_options)."""
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


def get_reward(purchased_product: dict, goal: dict, price: float, options: dict[str, str], **kwargs):
    """WebShop's score of a purchase:
        (matched attributes + matched options + price ok) / (goal attributes + goal options + 1) * r_type.
    With verbose=True also returns the parts (r_type, r_att, r_option, r_price, weights, match flags)."""
    r_type_dict = get_type_reward(purchased_product, goal)
    r_price = (price <= goal["price_upper"]) if goal["price_upper"] > 0 else None
    r_att, num_attr_matches = get_attribute_reward(purchased_product, goal)
    goal_options = goal["goal_options"]
    r_option, num_option_matches = get_option_reward(
        purchased_product,
        list(goal_options.values()) if isinstance(goal_options, dict) else goal_options,
        options,
    )
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
