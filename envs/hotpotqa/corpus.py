"""The local "Wikipedia": pages of sentences, title look-up, and a bm25s index for similar titles.

Search semantics follow ReAct's wikienv: an entity that names a page (same title up to case, punctuation,
articles and a trailing "(disambiguation)") returns the page's first paragraph (at most 5 sentences);
otherwise the 5 best bm25 matches are offered as "Similar: [...]". Lookup returns, one by one, the page's
sentences that contain the keyword (case-insensitive substring, as ReAct).

The bm25s index is built lazily (the first search that is not an exact title), kept in the Corpus object
and saved under cache_dir("hotpotqa")/index/<content hash>/ so the next process loads it instead.

User abstracts file (`corpus=`): JSON lines, one page per line, `{"title": str, "text": ...}` where `text`
is a string (paragraphs separated by newlines, sentences split at . ! ? followed by a capital), a list of
sentences (one paragraph, as HotpotQA's own abstracts dump) or a list of lists (paragraphs of sentences).
Files ending in .gz or .bz2 are read compressed. All text is mapped into the environment's ASCII charset.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core import OBS_MAX_CHARS, cache_dir, to_text
from .metrics import normalize_answer

FIRST_PARAGRAPH_SENTENCES = 5  # ReAct's get_page_obs shows the first 5 sentences
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)\s*$")


@dataclass
class Page:
    title: str
    paragraphs: list[list[str]]  # sentences of each paragraph, stripped, non-empty

    @property
    def sentences(self) -> list[str]:
        return [s for paragraph in self.paragraphs for s in paragraph]

    def first_paragraph(self) -> str:
        first = self.paragraphs[0] if self.paragraphs else []
        return " ".join(first[:FIRST_PARAGRAPH_SENTENCES])

    def lookup(self, keyword: str) -> list[str]:
        """The sentences a Lookup[keyword] walks through, in page order."""
        key = keyword.lower()
        return [s for s in self.sentences if key in s.lower()]


def _charset(text: str) -> str:
    # fast path: printable ASCII is already inside the charset (to_text checks char by char)
    # whitespace runs (newlines, tabs) become one space: a sentence must stay on one line of the agent format
    text = text if text.isascii() and text.isprintable() and len(text) <= OBS_MAX_CHARS else to_text(text)
    return " ".join(text.split())


def make_page(title: str, paragraphs: list[list[str]]) -> Page:
    """A page with its text mapped into the charset and empty sentences/paragraphs dropped."""
    clean = [[_charset(s).strip() for s in p] for p in paragraphs]
    clean = [[s for s in p if s] for p in clean]
    return Page(_charset(title).strip(), [p for p in clean if p])


def split_sentences(text: str) -> list[list[str]]:
    """Plain text -> paragraphs (one per non-blank line) of sentences."""
    return [_SENTENCE_END.split(line.strip()) for line in text.splitlines() if line.strip()]


def title_key(title: str) -> str:
    return normalize_answer(title)


class Corpus:
    """Pages by title (first one wins on duplicates) plus a lazily built bm25s index over title + text."""

    def __init__(self, pages: list[Page]):
        self.pages: list[Page] = []
        self.by_title: dict[str, Page] = {}
        for page in pages:
            if page.title and page.title not in self.by_title:
                self.by_title[page.title] = page
                self.pages.append(page)
        self._by_key: dict[str, Page] = {}
        base_count: dict[str, list[Page]] = {}
        for page in self.pages:
            self._by_key.setdefault(title_key(page.title), page)
            base_count.setdefault(title_key(_PARENTHETICAL.sub("", page.title)), []).append(page)
        # "Ed Wood" finds "Ed Wood (film)" only when no other page shares the base title (like a redirect)
        self._by_base = {k: v[0] for k, v in base_count.items() if len(v) == 1}
        digest = hashlib.sha1()
        for page in self.pages:
            digest.update(page.title.encode())
            for paragraph in page.paragraphs:
                digest.update(("\x1e" + "\x1f".join(paragraph)).encode())
        self.key = digest.hexdigest()[:16]
        self._index = None

    def __len__(self) -> int:
        return len(self.pages)

    def find(self, entity: str) -> Page | None:
        """The page an entity names, or None (then offer `similar`)."""
        entity = " ".join(entity.split())
        if entity in self.by_title:
            return self.by_title[entity]
        key = title_key(entity)
        if not key:
            return None
        return self._by_key.get(key) or self._by_base.get(key)

    def similar(self, query: str, k: int = 5) -> list[str]:
        """Titles of the k best bm25 matches (score > 0) over title + text."""
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens[0] or not self.pages:
            return []
        docs, scores = self.index.retrieve(tokens, k=min(k, len(self.pages)), show_progress=False)
        return [self.pages[int(d)].title for d, s in zip(docs[0], scores[0]) if s > 0]

    @property
    def index(self):
        if self._index is None:
            self._index = load_or_build_index(self)
        return self._index

    def release(self) -> None:
        self._index = None


def index_dir(corpus: Corpus) -> Path:
    return cache_dir("hotpotqa") / "index" / corpus.key


def load_or_build_index(corpus: Corpus):
    """bm25s index of the corpus: loaded from the disk cache when there, else built and saved there."""
    import bm25s

    path = index_dir(corpus)
    if (path / "params.index.json").exists():
        try:
            return bm25s.BM25.load(str(path), show_progress=False)
        except (OSError, ValueError, json.JSONDecodeError):
            shutil.rmtree(path, ignore_errors=True)  # a damaged cache entry is rebuilt below
    big = len(corpus) > 50_000
    texts = [page.title + " " + " ".join(page.sentences) for page in corpus.pages]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=big), show_progress=big)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    except OSError:
        return retriever  # the cache is not writable: keep the in-memory index only
    try:
        retriever.save(str(tmp), show_progress=False)
        os.replace(tmp, path)  # atomic: another process either sees the whole index or none
    except OSError:
        pass  # another process saved it first, or the cache is read-only: the in-memory index still works
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return retriever


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_abstracts(path: str | os.PathLike) -> list[Page]:
    """Pages from a JSON-lines abstracts file (format in the module docstring); errors name file:line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    pages = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with 'title' and 'text', got {type(row).__name__}")
            title, text = row.get("title"), row.get("text")
            if not isinstance(title, str) or not title.strip():
                raise ValueError(f"{where}: field 'title' must be a non-empty string")
            if isinstance(text, str):
                paragraphs = split_sentences(text)
            elif isinstance(text, list) and all(isinstance(s, str) for s in text):
                paragraphs = [text]
            elif isinstance(text, list) and all(isinstance(p, list) and all(isinstance(s, str) for s in p)
                                                for p in text):
                paragraphs = text
            else:
                raise ValueError(f"{where}: field 'text' must be a string, a list of sentences or a list of lists")
            pages.append(make_page(title, paragraphs))
    return pages
