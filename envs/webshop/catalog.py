"""The shop behind the environment: products, their prices, the goals (tasks) and a bm25s search over them.

Products are dicts with the keys WebShop's `load_products` gives them (Title, Description, BulletPoints,
Attributes, options, pricing, Price, Reviews, Rating, query, category, product_category, name, asin), so that
`goal.get_reward` scores generated and real products alike. Real data, any mix of:

  items_shuffle*.json     raw scraped products (a JSON list), loaded like web_agent_site.engine.load_products
  documents*.jsonl        pyserini documents {id, contents, product}: `product` already went through load_products
  items_ins_v2*.json      asin -> {attributes, instruction?, instruction_attributes?}  (synthetic goals)
  items_human_ins*.json   asin -> [{instruction, instruction_attributes, instruction_options, ...}]  (human goals)
  reviews*.json           [{asin, reviews, average_rating}]  (optional)
  session logs *.jsonl    lines {page, url, goal, ...} as in WebShop's all_trajs: their goal records become tasks

Goals are WebShop's human goals when any product has human instructions, else its synthetic goals; goals read
from session logs are added as they are. `data=None` generates a catalog offline (see generate.py).
"""
from __future__ import annotations

import functools
import json
import random
import re
from decimal import Decimal
from pathlib import Path

import bm25s
import numpy as np

from ..core import assign_splits
from . import goal as goal_lib

SEARCH_RETURN_N = 50
PRODUCT_WINDOW = 10
REMOVED_KEYS = ("product_information", "brand", "brand_url", "list_price", "availability_quantity",
                "availability_status", "total_reviews", "total_answered_questions", "seller_id", "seller_name",
                "fulfilled_by_amazon", "fast_track_message", "aplus_present", "small_description_old")


# --- reading real files -----------------------------------------------------------------------------------------
def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.startswith("items_shuffle") and name.endswith(".json"):
        return "raw_products"
    if name.startswith("documents") and name.endswith(".jsonl"):
        return "documents"
    if name.startswith("items_ins") and name.endswith(".json"):
        return "attributes"
    if name.startswith("items_human_ins") and name.endswith(".json"):
        return "human_instructions"
    if name.startswith("reviews") and name.endswith(".json"):
        return "reviews"
    if name.endswith(".jsonl"):
        return "session_log"
    return None


def find_data_files(data) -> dict[str, list[Path]]:
    """Sort the given files (or the files under the given directories) by kind; unknown files given by name
    are an error, unknown files inside a directory are skipped."""
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    found: dict[str, list[Path]] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"webshop data: {p} does not exist")
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            kind = _kind(f) if f.is_file() else None
            if kind is None and not p.is_dir():
                raise ValueError(f"webshop data: {f}: unknown file; expected items_shuffle*.json, documents*.jsonl, "
                                 "items_ins_v2*.json, items_human_ins*.json, reviews*.json or session-log *.jsonl")
            if kind is not None:
                found.setdefault(kind, []).append(f)
    if not found.get("raw_products") and not found.get("documents"):
        given = sorted(found)
        hint = (f" ({', '.join(f.name for k in given for f in found[k])} hold goals or logs, not products: give them "
                "together with a products file, e.g. the folder holding both)") if given else ""
        raise ValueError(f"webshop data {data!r}: no products (items_shuffle*.json or documents*.jsonl) found{hint}")
    return found


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None


def _read_jsonl(path: Path, field: str) -> list:
    """The `field` of every line of a JSON-lines file (lines without it are skipped)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
            if isinstance(record, dict) and field in record:
                out.append(record[field])
            elif field == "product":
                raise ValueError(f"{path}: line {lineno}: no field 'product' (a pyserini document needs it)")
    return out


def parse_pricing(pricing) -> tuple[list[float], str]:
    """'$8.99 - $32.99' -> ([8.99, 32.99], '$8.99 to $32.99'); missing -> ([100.0], '$100.0'), as load_products."""
    if not pricing:
        return [100.0], "$100.0"
    values = [float(Decimal(re.sub(r"[^\d.]", "", p))) for p in pricing.split("$")[1:]]
    if not values:
        return [100.0], "$100.0"
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def process_raw_product(p: dict, attributes: dict, reviews: dict, ratings: dict) -> dict:
    """One items_shuffle record as load_products leaves it (keys cleaned, pricing parsed, options lower-cased)."""
    for key in REMOVED_KEYS:
        p.pop(key, None)
    asin = p["asin"]
    p["Title"] = p["name"]
    p["Description"] = p["full_description"]
    p["Reviews"] = reviews.get(asin, [])
    p["Rating"] = ratings.get(asin, "N.A.")
    for r in p["Reviews"]:
        if "score" not in r:
            r["score"] = r.pop("stars", None)
        r["body"] = r.pop("review", "")
    small = p.get("small_description", [])
    p["BulletPoints"] = small if isinstance(small, list) else [small]
    p["pricing"], p["Price"] = parse_pricing(p.get("pricing"))
    options, option_to_image = {}, {}
    for option_name, option_contents in (p.get("customization_options") or {}).items():
        if option_contents is None:
            continue
        values = []
        for content in option_contents:
            value = content["value"].strip().replace("/", " | ").lower()
            values.append(value)
            option_to_image[value] = content.get("image")
        options[option_name.lower()] = values
    p["options"], p["option_to_image"] = options, option_to_image
    p["Attributes"] = attributes[asin]["attributes"] if "attributes" in attributes.get(asin, {}) else ["DUMMY_ATTR"]
    p["MainImage"] = (p.get("images") or [None])[0]
    p["query"] = p["query"].lower().strip()
    return p


def load_real(data, num_products: int | None) -> tuple[list[dict], list[dict]]:
    """Products (in file order, first `num_products`) and goal records from session logs."""
    files = find_data_files(data)
    attributes: dict = {}
    for f in files.get("attributes", []):
        attributes.update(_read_json(f))
    human: dict = {}
    for f in files.get("human_instructions", []):
        human.update(_read_json(f))
    reviews, ratings = {}, {}
    for f in files.get("reviews", []):
        for r in _read_json(f):
            reviews[r["asin"]], ratings[r["asin"]] = r["reviews"], r.get("average_rating", "N.A.")

    products, seen = [], set()
    raw = [p for f in files.get("raw_products", []) for p in _read_json(f)]
    docs = [p for f in files.get("documents", []) for p in _read_jsonl(f, "product")]
    for p, processed in [(p, False) for p in raw] + [(p, True) for p in docs]:
        if num_products is not None and len(products) >= num_products:
            break
        asin = str(p.get("asin", ""))
        if asin == "nan" or not asin or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        if not processed:
            p = process_raw_product(p, attributes, reviews, ratings)
        else:
            p.setdefault("Attributes", attributes.get(asin, {}).get("attributes", ["DUMMY_ATTR"]))
            p["query"] = str(p.get("query", "")).lower().strip()
        if asin in human:
            p["instructions"] = human[asin]
        if asin in attributes:  # what load_products does when human_goals=False
            p["instruction_text"] = attributes[asin].get("instruction")
            p["instruction_attributes"] = attributes[asin].get("instruction_attributes")
        products.append(p)

    logged_goals = []
    for f in files.get("session_log", []):
        for g in _read_jsonl(f, "goal"):
            logged_goals.append(g)
    return products, logged_goals


def generate_product_prices(all_products: list[dict], rng: random.Random) -> dict[str, float]:
    """The one price each product sells at: its single price, or uniform in its range (as WebShop)."""
    prices = {}
    for product in all_products:
        pricing = product["pricing"]
        if not pricing:
            price = 100.0
        elif len(pricing) == 1:
            price = pricing[0]
        else:
            price = rng.uniform(*pricing[:2])
        prices[product["asin"]] = price
    return prices


# --- search -----------------------------------------------------------------------------------------------------
def _stem(words: list[str]) -> list[str]:
    """A light plural stemmer (bars -> bar, glasses -> glass) so that queries and titles meet halfway; the
    original's Lucene analyser stems with Porter."""
    out = []
    for w in words:
        if len(w) > 4 and w.endswith("sses"):
            w = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.append(w)
    return out


def product_text(p: dict) -> str:
    return " ".join([p["Title"], " ".join(a for a in p["Attributes"] if a != "DUMMY_ATTR"), p["Description"]])


def tokenize(texts: list[str], ids: bool):
    return bm25s.tokenize(texts, stopwords="en", stemmer=_stem, show_progress=False, return_ids=ids)


# --- the shop ---------------------------------------------------------------------------------------------------
class Shop:
    """Products, prices, goals and splits; the bm25s index is built on the first search."""

    def __init__(self, products: list[dict], goals: list[dict], seed: int, prices: dict[str, float]):
        self.products = products
        self.product_item_dict = {p["asin"]: p for p in products}
        self.product_prices = prices
        self.goals: dict[str, dict] = {}
        per_asin: dict[str, int] = {}
        for g in goals:
            n = per_asin.get(g["asin"], 0)
            per_asin[g["asin"]] = n + 1
            self.goals[f"{g['asin']}-{n}"] = g
        self.splits = assign_splits(list(self.goals), seed)
        self.examples: dict = {}  # (task id, max steps, option matching) -> few-shot text, filled by WebShopEnv.example
        self._retriever = None

    def split_ids(self, split: str) -> list[str]:
        return self.splits[split]

    def search(self, query: str) -> list[str]:
        """ASINs of the top SEARCH_RETURN_N products by BM25 (only those sharing a word with the query)."""
        if self._retriever is None:
            self._retriever = bm25s.BM25()
            self._retriever.index(tokenize([product_text(p) for p in self.products], ids=True), show_progress=False)
        tokens = tokenize([query], ids=False)[0]
        tokens = [t for t in tokens if t]
        if not tokens:
            return []
        scores = self._retriever.get_scores(tokens)
        n = min(SEARCH_RETURN_N, len(scores))
        top = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
        top = sorted((int(i) for i in top if scores[i] > 0), key=lambda i: (-float(scores[i]), i))
        return [self.products[i]["asin"] for i in top]


def _data_key(data) -> tuple[str, ...] | None:
    if data is None:
        return None
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    return tuple(str(Path(p).resolve()) for p in paths)


@functools.lru_cache(maxsize=4)
def _build_shop(data_key: tuple[str, ...] | None, seed: int, num_products: int | None) -> Shop:
    rng = random.Random(seed)
    if data_key is None:
        from .generate import generate_catalog

        products, prices, goals = generate_catalog(seed=seed, num_products=num_products or 2000)
        return Shop(products, goals, seed, prices)
    products, logged_goals = load_real(list(data_key), num_products)
    prices = generate_product_prices(products, rng)
    if any("instructions" in p for p in products):
        goals = goal_lib.get_human_goals(products, prices, rng)
    else:
        goals = goal_lib.get_synthetic_goals(products, prices, rng)
    known = {(g["asin"], g["instruction_text"]) for g in goals}
    for g in logged_goals:
        if (g["asin"], g["instruction_text"]) not in known:
            known.add((g["asin"], g["instruction_text"]))
            goals.append(g)
    if not goals:
        raise ValueError(f"webshop data {list(data_key)}: no goals; give items_ins_v2*.json with instructions, "
                         "items_human_ins*.json, or session logs with goal records")
    return Shop(products, goals, seed, prices)


def get_shop(data=None, seed: int = 0, num_products: int | None = None) -> Shop:
    """The shop for these settings; shops are immutable and shared by the environments of one process (the
    last four kept), so that many environment copies cost one catalog and one index."""
    return _build_shop(_data_key(data), int(seed), num_products)
