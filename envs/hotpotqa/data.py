"""Questions and the corpus they are asked over: generated offline, or read from HotpotQA JSON files.

`load_dataset(data, corpus, seed, num_tasks)` returns a Dataset (tasks by id, train/valid/test id lists,
Corpus). Datasets are shared between environments of one process through a weak cache, so several envs on
the same data hold one copy, and the last `close()` frees it.

Real data (`data=`): HotpotQA's distractor or fullwiki JSON (a list of records with `_id`, `question`,
`answer`, `supporting_facts`, `context`, `type`), or JSON lines of such records.
  * a file, a directory (every *.json / *.jsonl in it) or a list of paths: the records are pooled and split
    train/valid/test 80/10/10 by `assign_splits` (deterministic from `seed`);
  * a dict {split: path or list of paths} (or the string "train=a.json,test=b.json"): each split reads its
    own files ("dev" means "valid"); a split not named has no tasks.
`num_tasks` keeps the first n records of the pool (of each split's files, for the dict form).
Records without an answer (the unlabelled test set) give no task, but their paragraphs join the corpus.
The corpus is every record's context paragraphs (title -> sentences, first one kept on duplicates), across
all splits, plus the pages of an optional abstracts file (`corpus=`, see corpus.py).
"""
from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import SPLITS, assign_splits, stable_hash, to_text
from .corpus import Corpus, Page, load_abstracts, make_page

DEFAULT_NUM_TASKS = 3000
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*[A-Za-z0-9]")
_STOP = frozenset("the a an of in on at to for and or but by with from as is was were are be been its it his her "
                  "their this that which who whom also into than then there they he she after before".split())


@dataclass
class Hop:
    """One fact the expert must read: `evidence` is a sentence of page `title`."""
    title: str     # the page to search
    evidence: str  # the exact page sentence that states the fact
    keyword: str   # Lookup[keyword] reaches `evidence` when the first paragraph does not show it
    fact: str      # the fact in words, for thoughts ("Night Harbor was directed by Mara Voss")
    goal: str      # what to find, as said before the search ("who directed Night Harbor")
    aim: str       # the same once on the page ("who directed it", "her birth year")


@dataclass
class Task:
    id: str
    question: str
    answer: str
    kind: str                # "bridge" or "comparison" (HotpotQA's `type`)
    hops: list[Hop]
    conclusions: list[str] = field(default_factory=list)  # final thoughts; empty = generic ones
    source: str = "generated"  # or the HotpotQA file the record came from


class Dataset:
    def __init__(self, tasks: list[Task], splits: dict[str, list[str]], corpus: Corpus):
        self.tasks = {t.id: t for t in tasks}
        self.splits = splits
        self.corpus = corpus


_LOADED: "weakref.WeakValueDictionary[str, Dataset]" = weakref.WeakValueDictionary()


def load_dataset(data: Any = None, corpus: str | os.PathLike | None = None, seed: int = 0,
                 num_tasks: int | None = None) -> Dataset:
    """The (weakly cached) dataset for these arguments; see the module docstring for `data`'s forms."""
    sources = _sources(data)
    key = stable_hash(_sources_key(sources), _file_key(corpus) if corpus else None, seed, num_tasks)
    dataset = _LOADED.get(key)
    if dataset is None:
        dataset = _build(sources, corpus, seed, num_tasks)
        _LOADED[key] = dataset
    return dataset


def _build(sources, corpus_path, seed: int, num_tasks: int | None) -> Dataset:
    extra_pages = load_abstracts(corpus_path) if corpus_path else []
    if sources is None:
        from .generate import generate

        pages, tasks = generate(seed, num_tasks or DEFAULT_NUM_TASKS)
        corpus = Corpus(pages + extra_pages)
        return Dataset(tasks, assign_splits([t.id for t in tasks], seed), corpus)
    per_split = {name: [r for path in paths for r in read_records(path)] for name, paths in sources.items()}
    if num_tasks is not None:
        per_split = {name: records[:num_tasks] for name, records in per_split.items()}
    corpus = Corpus(context_pages(r for records in per_split.values() for r in records) + extra_pages)
    tasks, ids_of = [], {}
    for name, records in per_split.items():
        seen = set()
        for record, where in records:
            if record.get("answer") is None or record["_id"] in seen:
                continue
            seen.add(record["_id"])
            tasks.append(real_task(record, corpus, where))
            ids_of.setdefault(name, []).append(record["_id"])
    if "pool" in sources:
        splits = assign_splits(ids_of.get("pool", []), seed)
    else:
        splits = {name: ids_of.get(name, []) for name in SPLITS}
    if len({t.id for t in tasks}) != len(tasks):
        raise ValueError("the same HotpotQA _id appears in the files of two splits; splits must be disjoint")
    return Dataset(tasks, splits, corpus)


# --- real HotpotQA records ------------------------------------------------------------------------------------

def _sources(data: Any) -> dict[str, list[Path]] | None:
    """None (generate) or {split or "pool": [files]}."""
    if data is None:
        return None
    if isinstance(data, str) and "=" in data and not Path(data).exists():
        data = dict(part.split("=", 1) for part in data.split(",") if part.strip())
    if isinstance(data, dict):
        out = {}
        for name, paths in data.items():
            split = {"dev": "valid", "validation": "valid"}.get(str(name).strip(), str(name).strip())
            if split not in SPLITS:
                raise ValueError(f"data: unknown split {name!r}; use {', '.join(SPLITS)} (or dev)")
            out[split] = _files(paths)
        return out
    return {"pool": _files(data)}


def _files(paths: Any) -> list[Path]:
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    files = []
    for item in items:
        path = Path(os.fspath(item).strip() if isinstance(item, str) else item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
            if not found:
                raise FileNotFoundError(f"data directory {path} holds no .json or .jsonl HotpotQA file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"HotpotQA data file {path} does not exist")
    return files


def _file_key(path) -> str:
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _sources_key(sources) -> str | None:
    if sources is None:
        return None
    return repr(sorted((name, [_file_key(p) for p in paths]) for name, paths in sources.items()))


def read_records(path: Path) -> list[tuple[dict, str]]:
    """Validated records of one file, each with where it came from ("file record 3" / "file:line")."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        located = [(row, f"{path} record {i}") for i, row in enumerate(rows)]
    else:
        located = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((json.loads(line), f"{path}:{line_no}"))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
    for row, where in located:
        _check_record(row, where)
    return located


def _check_record(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a HotpotQA record (an object), got {type(row).__name__}")
    for name, kind in (("_id", str), ("question", str), ("context", list)):
        if not isinstance(row.get(name), kind):
            raise ValueError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    if row.get("answer") is not None and not isinstance(row["answer"], str):
        raise ValueError(f"{where}: field 'answer' must be a string")
    for i, item in enumerate(row["context"]):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)
                and all(isinstance(s, str) for s in item[1])):
            raise ValueError(f"{where}: field 'context'[{i}] must be [title, [sentences...]]")
    for i, item in enumerate(row.get("supporting_facts") or []):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)):
            raise ValueError(f"{where}: field 'supporting_facts'[{i}] must be [title, sentence_index]")


def context_pages(records) -> list[Page]:
    return [make_page(title, [sentences]) for record, _ in records for title, sentences in record["context"]]


def pick_keyword(page: Page, sentence: str) -> str:
    """The word of `sentence` whose Lookup reaches it soonest on `page` (ties: the longest word)."""
    best, best_rank = "", None
    for word in dict.fromkeys(_WORD.findall(sentence)):
        if len(word) < 3 or word.lower() in _STOP:
            continue
        hits = page.lookup(word)
        if sentence in hits:
            rank = (hits.index(sentence), -len(word))
            if best_rank is None or rank < best_rank:
                best, best_rank = word, rank
    return best or sentence[:40]


def _one_line(text: str) -> str:
    return " ".join(to_text(text).split())  # as make_page stores page text


def real_task(record: dict, corpus: Corpus, where: str) -> Task:
    """A Task from a HotpotQA record: one hop per supporting sentence, grouped by title in order of first use."""
    context = {_one_line(t): [_one_line(s) for s in sents] for t, sents in record["context"]}
    order: dict[str, list[int]] = {}
    for title, idx in record.get("supporting_facts") or []:
        order.setdefault(_one_line(title), []).append(idx)
    hops = []
    for title, indices in order.items():
        page, sentences = corpus.by_title.get(title), context.get(title, [])
        for idx in sorted(set(indices)):
            # HotpotQA has a few supporting facts that point past the paragraph; they cannot be read
            if page is None or not 0 <= idx < len(sentences) or sentences[idx] not in page.sentences:
                continue
            evidence = sentences[idx]
            # a sentence that Search shows needs no Lookup: skip the keyword search (it is costly on big files)
            shown = evidence in page.first_paragraph()
            keyword = next(iter(_WORD.findall(evidence)), evidence[:40]) if shown else pick_keyword(page, evidence)
            hops.append(Hop(title=title, evidence=evidence, keyword=keyword,
                            fact=evidence.rstrip("."), goal=f"what {title} says", aim="the fact I need"))
    return Task(id=record["_id"], question=to_text(record["question"]).strip(), answer=record["answer"],
                kind=str(record.get("type") or "bridge"), hops=hops, source=where)
