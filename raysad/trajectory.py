"""Trajectory/Turn schema; streaming JSONL and Parquet read/write; validation with file:line:field errors.

A trajectory file is either JSON lines (`.jsonl` or `.json`, one trajectory per line) or Parquet
(`.parquet`, one trajectory per row). Both stream: reading never holds more than one line (JSONL) or one
row group (Parquet) in memory, so a million trajectories read like ten.

Durability: a JSONL record is flushed as it is written. A Parquet writer writes its rows in complete, fsynced
part files under `<path>.parts/` as it goes, and merges them into `path` on close; a killed writer leaves
`path` plus parts that every reader here (read_trajectories, read_task_ids, count_trajectories) reads as one
output, and the next writer merges. Rows still buffered when a process is killed are lost, but they were never
reported as written (a rollout re-plays them).

    with TrajectoryWriter("trajs.jsonl", append=True) as out:   # resume: skip read_task_ids(path)
        out.write(traj)
    for traj in read_trajectories("trajs.jsonl"):
        ...

Field contract (docs/architecture.md, "Interfaces"): `Turn.token_ids` are the ids a model generated for the
thought segment (thought + its end delimiter) followed by those of the action segment (action + its end
delimiter); `num_thought_tokens` is where the split is; `topk_ids`/`topk_logprobs` hold k entries per
generated token. Fields a reader does not know (top level or per turn) land in `extra` and are written back
flat, so a round trip keeps them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

TRAJECTORY_FIELDS = ("id", "env", "task_id", "split", "instruction", "prompt", "turns", "reward", "success",
                     "policy")
TURN_FIELDS = ("thought", "action", "observation")
TURN_OPTIONAL_FIELDS = ("token_ids", "topk_ids", "topk_logprobs", "num_thought_tokens")
MAX_ERRORS_KEPT = 20  # how many messages a skip_bad reader keeps in `.errors`


class TrajectoryError(ValueError):
    """Bad trajectory input. The message names the file, the line (JSONL) or row (Parquet) and the field."""


@dataclass
class Turn:
    thought: str
    action: str
    observation: str
    token_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    num_thought_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown per-turn fields, written back flat

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"thought": self.thought, "action": self.action, "observation": self.observation}
        for name in TURN_OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        _merge_extra(d, self.extra, (*TURN_FIELDS, *TURN_OPTIONAL_FIELDS), "turn")
        return d


@dataclass
class Trajectory:
    id: str
    env: str
    task_id: str
    split: str
    instruction: str
    prompt: str
    turns: list[Turn]
    reward: float
    success: bool
    policy: dict[str, Any]  # {"backend": ..., "model": ...}
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level fields; extra["error"] on failure

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able dict: the known fields in contract order, then the `extra` fields."""
        d = {"id": self.id, "env": self.env, "task_id": self.task_id, "split": self.split,
             "instruction": self.instruction, "prompt": self.prompt,
             "turns": [t.to_dict() for t in self.turns], "reward": self.reward, "success": self.success,
             "policy": self.policy}
        _merge_extra(d, self.extra, TRAJECTORY_FIELDS, "trajectory")
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "trajectory") -> Trajectory:
        """Validate `d` and build a Trajectory; raise TrajectoryError "<where>: field '<name>': <problem>"."""
        validate(d, where)
        turns = []
        for t in d["turns"]:
            known = {k: t[k] for k in (*TURN_FIELDS, *TURN_OPTIONAL_FIELDS) if k in t}
            turns.append(Turn(**known, extra={k: v for k, v in t.items() if k not in known}))
        extra = {k: v for k, v in d.items() if k not in TRAJECTORY_FIELDS}
        return cls(**{k: d[k] for k in TRAJECTORY_FIELDS if k != "turns"}, turns=turns, extra=extra)


def _merge_extra(d: dict, extra: dict, known: tuple[str, ...], what: str) -> None:
    clash = sorted(set(extra) & set(known))
    if clash:
        raise ValueError(f"{what} extra holds known field name(s) {clash}; set them as attributes instead")
    d.update(extra)


# --- validation ------------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _bad(where: str, name: str, problem: str) -> TrajectoryError:
    return TrajectoryError(f"{where}: field '{name}': {problem}")


def _is_number(x: Any) -> bool:
    return type(x) is float or type(x) is int


def _check_int_list(value: Any, where: str, name: str) -> None:
    if type(value) is not list:
        raise _bad(where, name, f"expected a list of int, got {_type_name(value)}")
    if not all(type(x) is int for x in value):
        j = next(j for j, x in enumerate(value) if type(x) is not int)
        raise _bad(where, f"{name}[{j}]", f"expected int, got {_type_name(value[j])}")


def _check_rows(value: Any, where: str, name: str, n_rows: int, is_item, item: str) -> list[int]:
    """A list of n_rows lists whose items pass `is_item`; returns the row lengths."""
    if type(value) is not list:
        raise _bad(where, name, f"expected a list of lists, got {_type_name(value)}")
    if len(value) != n_rows:
        raise _bad(where, name, f"expected {n_rows} rows (one per token id), got {len(value)}")
    for j, row in enumerate(value):
        if type(row) is not list:
            raise _bad(where, f"{name}[{j}]", f"expected a list of {item}, got {_type_name(row)}")
        if not all(is_item(x) for x in row):
            m = next(m for m, x in enumerate(row) if not is_item(x))
            raise _bad(where, f"{name}[{j}][{m}]", f"expected {item}, got {_type_name(row[m])}")
    return [len(row) for row in value]


def validate(d: Any, where: str = "trajectory") -> None:
    """Check one trajectory dict (the JSON form) against the schema; the first problem raises TrajectoryError."""
    if not isinstance(d, dict):
        raise TrajectoryError(f"{where}: expected a JSON object, got {_type_name(d)}")
    for name in TRAJECTORY_FIELDS:
        if name not in d:
            raise _bad(where, name, "missing")
    for name in ("id", "env", "task_id", "split", "instruction", "prompt"):
        if type(d[name]) is not str:
            raise _bad(where, name, f"expected str, got {_type_name(d[name])}")
    if not _is_number(d["reward"]):
        raise _bad(where, "reward", f"expected float, got {_type_name(d['reward'])}")
    if type(d["success"]) is not bool:
        raise _bad(where, "success", f"expected bool, got {_type_name(d['success'])}")
    if not isinstance(d["policy"], dict):
        raise _bad(where, "policy", f"expected an object like {{\"backend\": ..., \"model\": ...}}, "
                                    f"got {_type_name(d['policy'])}")
    turns = d["turns"]
    if type(turns) is not list:
        raise _bad(where, "turns", f"expected a list, got {_type_name(turns)}")
    for i, t in enumerate(turns):
        at = f"turns[{i}]"
        if not isinstance(t, dict):
            raise _bad(where, at, f"expected an object, got {_type_name(t)}")
        for name in TURN_FIELDS:
            if name not in t:
                raise _bad(where, f"{at}.{name}", "missing")
            if type(t[name]) is not str:
                raise _bad(where, f"{at}.{name}", f"expected str, got {_type_name(t[name])}")
        _validate_tokens(t, where, at)


def _validate_tokens(t: dict, where: str, at: str) -> None:
    ids = t.get("token_ids")
    if ids is None:
        for name in TURN_OPTIONAL_FIELDS:
            if t.get(name) is not None:
                raise _bad(where, f"{at}.{name}", "given without token_ids")
        return
    _check_int_list(ids, where, f"{at}.token_ids")
    n = t.get("num_thought_tokens")
    if n is None:
        raise _bad(where, f"{at}.num_thought_tokens", "missing (required with token_ids)")
    if type(n) is not int:
        raise _bad(where, f"{at}.num_thought_tokens", f"expected int, got {_type_name(n)}")
    if not 0 <= n <= len(ids):
        raise _bad(where, f"{at}.num_thought_tokens", f"{n} is outside 0..{len(ids)} (the number of token_ids)")
    topk_ids, topk_lp = t.get("topk_ids"), t.get("topk_logprobs")
    if (topk_ids is None) != (topk_lp is None):
        missing = "topk_logprobs" if topk_lp is None else "topk_ids"
        raise _bad(where, f"{at}.{missing}", "missing (topk_ids and topk_logprobs go together)")
    if topk_ids is None:
        return
    k_ids = _check_rows(topk_ids, where, f"{at}.topk_ids", len(ids), lambda x: type(x) is int, "int")
    k_lp = _check_rows(topk_lp, where, f"{at}.topk_logprobs", len(ids), _is_number, "float")
    if k_ids != k_lp:
        j = next(j for j, (a, b) in enumerate(zip(k_ids, k_lp)) if a != b)
        raise _bad(where, f"{at}.topk_logprobs[{j}]", f"expected {k_ids[j]} entries (as topk_ids[{j}]), "
                                                      f"got {k_lp[j]}")


# --- formats ---------------------------------------------------------------------------------------------

def file_format(path: str | Path) -> str:
    """'jsonl' for .jsonl/.json (JSON lines), 'parquet' for .parquet."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise TrajectoryError(f"{path}: unknown trajectory file type {suffix!r}; use .jsonl (or .json lines) or .parquet")


def _parquet_schema():
    import pyarrow as pa

    turn = pa.struct([
        ("thought", pa.string()), ("action", pa.string()), ("observation", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # float32: half the bytes; plenty for logprobs
        ("num_thought_tokens", pa.int32()),
        ("extra", pa.string()),  # JSON object of unknown per-turn fields, or null
    ])
    return pa.schema([
        ("id", pa.string()), ("env", pa.string()), ("task_id", pa.string()), ("split", pa.string()),
        ("instruction", pa.string()), ("prompt", pa.string()), ("turns", pa.list_(turn)),
        ("reward", pa.float64()), ("success", pa.bool_()),
        ("policy", pa.string()),  # JSON object
        ("extra", pa.string()),   # JSON object of unknown top-level fields
    ])


def _to_parquet_row(d: dict) -> dict:
    turns = []
    for t in d["turns"]:
        known = {k: t.get(k) for k in (*TURN_FIELDS, *TURN_OPTIONAL_FIELDS)}
        extra = {k: v for k, v in t.items() if k not in known}
        turns.append({**known, "extra": json.dumps(extra, ensure_ascii=False) if extra else None})
    extra = {k: v for k, v in d.items() if k not in TRAJECTORY_FIELDS}
    return {**{k: d[k] for k in TRAJECTORY_FIELDS}, "turns": turns,
            "policy": json.dumps(d["policy"], ensure_ascii=False),
            "extra": json.dumps(extra, ensure_ascii=False) if extra else None}


def _from_parquet_row(row: dict, where: str) -> dict:
    """A Parquet row (ours, or a foreign file with the same column names) back into the flat JSON form."""
    d = dict(row)
    for name in ("policy", "extra"):
        if isinstance(d.get(name), str):
            try:
                d[name] = json.loads(d[name])
            except json.JSONDecodeError as err:
                raise _bad(where, name, f"invalid JSON: {err}") from None
    extra = d.pop("extra", None) or {}
    if isinstance(d.get("turns"), list):
        turns = []
        for i, t in enumerate(d["turns"]):
            if isinstance(t, dict):
                t = {k: v for k, v in t.items() if not (v is None and k in (*TURN_OPTIONAL_FIELDS, "extra"))}
                if isinstance(t.get("extra"), str):
                    try:
                        t.update(json.loads(t.pop("extra")))
                    except json.JSONDecodeError as err:
                        raise _bad(where, f"turns[{i}].extra", f"invalid JSON: {err}") from None
            turns.append(t)
        d["turns"] = turns
    if isinstance(extra, dict):
        d.update({k: v for k, v in extra.items() if k not in d})
    return d


# --- reading ---------------------------------------------------------------------------------------------

class TrajectoryReader:
    """An iterator over the trajectories of one file, streaming.

    skip_bad=False: the first bad line/row raises TrajectoryError. skip_bad=True: bad lines are skipped;
    `.skipped` counts them and `.errors` keeps the first MAX_ERRORS_KEPT messages. `.read` counts the
    trajectories yielded. An empty file (no trajectory at all) raises in both modes.
    """

    def __init__(self, path: str | Path, skip_bad: bool = False, batch_size: int = 16):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.batch_size = batch_size  # Parquet rows decoded at a time
        self.skipped = 0
        self.read = 0
        self.errors: list[str] = []
        kind = file_format(self.path)
        if not (self.path.is_file() or (kind == "parquet" and _parquet_sources(self.path))):
            raise TrajectoryError(f"{self.path}: no such file")
        self._gen = self._jsonl() if kind == "jsonl" else self._parquet()

    def __iter__(self) -> TrajectoryReader:
        return self

    def __next__(self) -> Trajectory:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> TrajectoryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bad(self, err: TrajectoryError) -> None:
        if not self.skip_bad:
            raise err
        self.skipped += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(str(err))

    def _done(self, records: int) -> None:
        if records == 0:
            raise TrajectoryError(f"{self.path}: empty file (no trajectories)")
        if self.skipped:
            log.warning("%s: skipped %d bad trajectories (first: %s)", self.path, self.skipped, self.errors[0])

    def _jsonl(self) -> Iterator[Trajectory]:
        records = 0
        with open(self.path, "rb") as f:  # bytes, decoded per line: a decode error names its line
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # blank lines are allowed (and not records)
                records += 1
                try:
                    traj = parse_jsonl_line(raw, f"{self.path}:{line_no}")
                except TrajectoryError as err:
                    self._bad(err)
                    continue
                self.read += 1
                yield traj
        self._done(records)

    def _parquet(self) -> Iterator[Trajectory]:
        row_no = 0
        for source in _parquet_sources(self.path):  # the file, then the parts a killed writer left
            with _open_parquet(source) as pf:
                for batch in pf.iter_batches(batch_size=self.batch_size):
                    for row in batch.to_pylist():
                        row_no += 1
                        try:
                            traj = parse_parquet_row(row, f"{self.path}:row {row_no}")
                        except TrajectoryError as err:
                            self._bad(err)
                            continue
                        self.read += 1
                        yield traj
        self._done(row_no)


def parse_jsonl_line(raw: bytes, where: str) -> Trajectory:
    """One JSONL record (bytes of one line), validated; errors name `where` (file:line) and the field."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TrajectoryError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                              "is this a binary file? Trajectories are JSONL (one JSON object a line) or .parquet"
                              ) from None
    try:
        d = json.loads(line)
    except json.JSONDecodeError as err:
        raise TrajectoryError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
    return Trajectory.from_dict(d, where)


def parse_parquet_row(row: dict, where: str) -> Trajectory:
    """One Parquet row (ours or a foreign file with our column names), validated; errors name `where`."""
    return Trajectory.from_dict(_from_parquet_row(row, where), where)


def _open_parquet(source: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a truncated or foreign file
        raise TrajectoryError(f"{source}: not a readable Parquet file: {err}") from None


# --- shards: a file cut into pieces that are read apart (by Ray Data tasks) -----------------------------------

def shards(path: str | Path, records_per_shard: int = 128) -> list[dict]:
    """A trajectory file cut into pieces of about `records_per_shard` records, in file order, each readable on
    its own with read_shard (a JSONL byte range; a Parquet row group). Records are numbered as
    read_trajectories yields them (`first_record`), so errors still name the file's line or row.
    Costs one pass over a JSONL file's bytes (nothing kept) and a Parquet file's footer."""
    path = Path(path)
    kind = file_format(path)
    found: list[dict] = []
    records = 0
    if kind == "jsonl":
        if not path.is_file():
            raise TrajectoryError(f"{path}: no such file")
        start = offset = 0
        first_line = line_no = 1
        in_shard = 0
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if in_shard == 0:
                    start, first_line = offset, line_no
                offset += len(raw)
                if raw.strip():
                    in_shard += 1
                    records += 1
                if in_shard == records_per_shard:
                    found.append({"kind": "jsonl", "path": str(path), "start": start, "end": offset,
                                  "first_line": first_line, "first_record": records - in_shard})
                    in_shard = 0
        if in_shard:
            found.append({"kind": "jsonl", "path": str(path), "start": start, "end": offset,
                          "first_line": first_line, "first_record": records - in_shard})
    else:
        sources = _parquet_sources(path)
        if not sources:
            raise TrajectoryError(f"{path}: no such file")
        for source in sources:
            with _open_parquet(source) as pf:
                for group in range(pf.num_row_groups):
                    n = pf.metadata.row_group(group).num_rows
                    found.append({"kind": "parquet", "path": str(path), "source": str(source), "row_group": group,
                                  "first_record": records})
                    records += n
    if records == 0:
        raise TrajectoryError(f"{path}: empty file (no trajectories)")
    return found


def read_shard(shard: dict) -> Iterator[Trajectory]:
    """The trajectories of one shard (see shards), validated; the first bad record raises TrajectoryError
    naming the file and its line (JSONL) or row (Parquet)."""
    if shard["kind"] == "jsonl":
        with open(shard["path"], "rb") as f:
            f.seek(shard["start"])
            line_no = shard["first_line"] - 1
            while f.tell() < shard["end"]:
                raw = f.readline()
                line_no += 1
                if raw.strip():
                    yield parse_jsonl_line(raw, f"{shard['path']}:{line_no}")
        return
    row_no = shard["first_record"]
    with _open_parquet(Path(shard["source"])) as pf:
        for row in pf.read_row_group(shard["row_group"]).to_pylist():
            row_no += 1
            yield parse_parquet_row(row, f"{shard['path']}:row {row_no}")


def read_trajectories(path: str | Path, skip_bad: bool = False) -> TrajectoryReader:
    """Stream the trajectories of a .jsonl/.json/.parquet file (see TrajectoryReader for skip_bad)."""
    return TrajectoryReader(path, skip_bad=skip_bad)


_TASK_ID = re.compile(r'"task_id"\s*:\s*("(?:[^"\\]|\\.)*")')


def read_task_ids(path: str | Path) -> set[str]:
    """The task ids already in a file, cheaply (for resuming a rollout); a missing file gives an empty set.

    JSONL: a regex finds the first "task_id" key of each complete line (our writer puts it third, before any
    nested object), so big lines are not parsed; a line cut short by a crash is not counted. Parquet: reads
    only the task_id column (of the file and of the parts a killed writer left).
    """
    ok, errored = read_task_status(path)
    return ok | errored


def read_task_status(path: str | Path) -> tuple[set[str], set[str]]:
    """(task ids with a complete record, task ids whose record carries extra["error"]) of a file; a task id with
    both a clean and an errored record counts as clean. A missing file gives two empty sets."""
    path = Path(path)
    ok: set[str] = set()
    errored: set[str] = set()
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        for source in _parquet_sources(path):
            with pq.ParquetFile(source) as pf:
                columns = [c for c in ("task_id", "extra") if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(columns=columns, batch_size=65536):
                    ids = batch.column(0).to_pylist()
                    extras = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(ids)
                    for task_id, extra in zip(ids, extras):
                        if task_id is not None:
                            (errored if _has_error(extra) else ok).add(task_id)
        return ok, errored - ok
    if not path.is_file():
        return ok, errored
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                continue  # the last line of a crashed write
            task_id, error = _line_status(line)
            if task_id is not None:
                (errored if error else ok).add(task_id)
    return ok, errored - ok


def _has_error(extra: Any) -> bool:
    """Whether a Parquet row's `extra` (a JSON object string, or a dict) holds an "error"."""
    if isinstance(extra, str):
        if '"error"' not in extra:
            return False
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            return False
    return isinstance(extra, dict) and extra.get("error") is not None


def _line_status(line: str) -> tuple[str | None, bool]:
    """(task id, has a top-level "error") of one JSONL line; parses the line only when it may hold an error."""
    m = _TASK_ID.search(line)
    if m and '"error"' not in line:
        return json.loads(m.group(1)), False
    if not line.strip():
        return None, False
    try:
        d = json.loads(line)
    except json.JSONDecodeError:
        return (json.loads(m.group(1)) if m else None), False
    if not isinstance(d, dict) or not isinstance(d.get("task_id"), str):
        return None, False
    return d["task_id"], d.get("error") is not None


def count_trajectories(path: str | Path) -> int:
    """Number of records (non-blank lines, or Parquet rows) without parsing them; 0 for a missing file."""
    path = Path(path)
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        total = 0
        for source in _parquet_sources(path):
            with pq.ParquetFile(source) as pf:
                total += pf.metadata.num_rows
        return total
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# --- Parquet parts ---------------------------------------------------------------------------------------

MERGED_PARTS_KEY = b"raysad.merged_parts"  # Parquet metadata of a merged file: the part files it holds


def content_sha256(path: str | Path) -> str:
    """SHA-256 of a trajectories file's bytes (and of a Parquet output's unmerged parts, `<path>.parts/`)."""
    import hashlib

    digest = hashlib.sha256()
    parts = Path(str(path) + ".parts")
    for file in [Path(path), *(sorted(p for p in parts.iterdir() if p.is_file()) if parts.is_dir() else [])]:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def parts_dir(path: str | Path) -> Path:
    """Where a Parquet writer puts its complete part files before merging them into `path`."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _merged_parts(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 -- an unreadable file is reported by whoever reads its rows
        return set()
    try:
        return set(json.loads(meta.get(MERGED_PARTS_KEY, b"[]")))
    except (ValueError, TypeError):
        return set()


def _parquet_sources(path: str | Path) -> list[Path]:
    """The files of a Parquet output, in order: `path` (if any), then the complete parts a killed writer left
    in `<path>.parts/` that `path` does not already hold (a merge killed before deleting them)."""
    path = Path(path)
    sources = [path] if path.is_file() else []
    parts = parts_dir(path)
    if parts.is_dir():
        merged = _merged_parts(path)
        sources += sorted(p for p in parts.glob("part-*.parquet") if p.name not in merged)
    return sources


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# --- writing ---------------------------------------------------------------------------------------------

class TrajectoryWriter:
    """Write trajectories to .jsonl/.json or .parquet; a context manager. Every record is validated first.

    JSONL: each record is one line, flushed as it is written, so a killed process loses at most the line being
    written; append=True continues the file (a last line cut short by a crash is dropped first, with a
    warning).
    Parquet: records are buffered and written as complete part files (`<path>.parts/part-*.parquet`, each
    written to a temporary name, fsynced, then renamed) once `part_rows` rows, `row_group_tokens` token ids or
    `part_s` seconds have gathered; close() (which also runs when the `with` body raises) writes the last part
    and merges `path` and the parts into a new `path` (row groups of `row_group_size` rows, replaced
    atomically), then deletes the parts. A killed process leaves `path` and its parts, which the readers here
    read as one output (durable rows = what they read); append=True continues it, append=False starts over.
    `.durable` counts the records of this writer that are safely on disk (a reader sees them after a kill).

    drop_task_ids (append only): records of these task ids are removed from the existing output first (an
    atomic rewrite), e.g. errored episodes that this run plays again; so the output holds one copy per task.
    """

    def __init__(self, path: str | Path, append: bool = False, row_group_size: int = 512,
                 row_group_tokens: int = 2_000_000, part_rows: int = 256, part_s: float = 2.0,
                 drop_task_ids: set[str] | frozenset[str] | None = None):
        self.path = Path(path)
        self.kind = file_format(self.path)
        self.append = append
        self.row_group_size = row_group_size
        self.row_group_tokens = row_group_tokens  # flush earlier when rows carry many token ids / top-k
        self.part_rows, self.part_s = part_rows, part_s
        self.count = 0  # records written by this writer (not counting rows carried over by append)
        self.durable = 0  # of those, the ones on disk in a complete line / part file
        self._buffer: list[dict] = []
        self._buffer_tokens = 0
        self._buffer_since = 0.0
        self._closed = False
        drop = set(drop_task_ids or ()) if append else set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "jsonl":
            if append and self.path.is_file():
                _drop_partial_last_line(self.path)
                if drop:
                    _drop_jsonl_tasks(self.path, drop)
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        else:
            self._open_parquet(drop)

    def _open_parquet(self, drop: set[str]) -> None:
        import uuid

        self._schema = _parquet_schema()
        self._parts = parts_dir(self.path)
        self._part_prefix = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._part_seq = 0
        if not self.append:  # start over: the old output goes now, so that a kill cannot mix old and new
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self._parts, ignore_errors=True)
        elif self._parts.is_dir():
            for stale in self._parts.glob("*.tmp"):  # a part whose write was killed: never counted
                stale.unlink(missing_ok=True)
            for merged in _merged_parts(self.path):  # a merge killed before it deleted its parts
                (self._parts / merged).unlink(missing_ok=True)
        if self.append and self.path.is_file():
            import pyarrow.parquet as pq

            try:
                with pq.ParquetFile(self.path) as old:
                    ours = old.schema_arrow.equals(self._schema)
            except Exception as err:
                raise TrajectoryError(f"{self.path}: cannot append, not a readable Parquet file: {err}") from None
            if not ours or drop:
                self._merge(drop)
        elif self.append and drop:
            self._merge(drop)
        self._parts.mkdir(parents=True, exist_ok=True)

    def write(self, traj: Trajectory | dict) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        where = f"{self.path}: trajectory {self.count + 1}"
        d = traj.to_dict() if isinstance(traj, Trajectory) else traj
        validate(d, f"{where} (id={d.get('id')!r})" if isinstance(d, dict) else where)
        self.count += 1
        if self.kind == "jsonl":
            self._file.write(json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n")
            self._file.flush()
            self.durable = self.count
        else:
            self._add(d)

    def _add(self, d: dict) -> None:
        if not self._buffer:
            self._buffer_since = time.monotonic()
        self._buffer.append(_to_parquet_row(d))
        self._buffer_tokens += sum(len(t.get("token_ids") or ()) * (1 + len((t.get("topk_ids") or [[]])[0]))
                                   for t in d["turns"])
        if (len(self._buffer) >= self.part_rows or self._buffer_tokens >= self.row_group_tokens
                or time.monotonic() - self._buffer_since >= self.part_s):
            self._flush()

    def flush(self) -> None:
        """Make every record written so far durable (Parquet: write the buffered rows as a part file)."""
        if self.kind == "jsonl":
            self._file.flush()
            os.fsync(self._file.fileno())
        else:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        self._part_seq += 1
        final = self._parts / f"{self._part_prefix}-{self._part_seq:06d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd", row_group_size=self.row_group_size)
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(self._parts)
        self._buffer, self._buffer_tokens = [], 0
        self.durable = self.count

    def _merge(self, drop: set[str] | None = None) -> None:
        """`path` + its parts (minus `drop` task ids) -> a new `path`, atomically; then the parts go. The new file
        names the parts it holds (metadata), so a merge killed before deleting them does not count them twice."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        sources = _parquet_sources(self.path)
        parts = [p for p in sources if p != self.path]
        tmp = self.path.with_name(self.path.name + ".partial")
        meta = {MERGED_PARTS_KEY: json.dumps([p.name for p in parts]).encode()}
        drop_arr = pa.array(sorted(drop), pa.string()) if drop else None
        pending: list = []
        pending_rows = 0

        def put(writer, table, final=False):
            nonlocal pending, pending_rows
            if table is not None and table.num_rows:
                pending.append(table)
                pending_rows += table.num_rows
            while pending_rows >= self.row_group_size or (final and pending_rows):
                whole = pa.concat_tables(pending)
                n = min(self.row_group_size, whole.num_rows)
                writer.write_table(whole.slice(0, n), row_group_size=n)
                rest = whole.slice(n)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

        with pq.ParquetWriter(tmp, self._schema.with_metadata(meta), compression="zstd") as writer:
            for source in sources:
                with pq.ParquetFile(source) as pf:
                    ours = pf.schema_arrow.equals(self._schema)
                if not ours:  # a foreign schema: carry the rows over through the validating reader
                    rows = [_to_parquet_row(t.to_dict()) for t in _iter_file(source)
                            if not drop or t.task_id not in drop]
                    for i in range(0, len(rows), self.row_group_size):
                        put(writer, pa.Table.from_pylist(rows[i:i + self.row_group_size], schema=self._schema))
                    continue
                with pq.ParquetFile(source) as pf:
                    for batch in pf.iter_batches(batch_size=self.row_group_size):
                        table = pa.Table.from_batches([batch]).cast(self._schema)
                        if drop_arr is not None:
                            table = table.filter(pc.invert(pc.is_in(table.column("task_id"), value_set=drop_arr)))
                        put(writer, table)
            put(writer, None, final=True)
        _fsync_file(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        for part in parts:
            part.unlink(missing_ok=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.kind == "jsonl":
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
            return
        self._flush()
        self._merge()
        shutil.rmtree(self._parts, ignore_errors=True)

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _iter_file(source: Path) -> Iterator[Trajectory]:
    """The trajectories of one Parquet file alone (not its parts), validated."""
    with _open_parquet(source) as pf:
        row_no = 0
        for batch in pf.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                row_no += 1
                yield parse_parquet_row(row, f"{source}:row {row_no}")


def _drop_jsonl_tasks(path: Path, drop: set[str]) -> None:
    """Rewrite a JSONL file without the records of `drop` task ids (atomically; untouched if none is there)."""
    tmp = path.with_name(path.name + ".partial")
    dropped = 0
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for line in src:
            task_id, _ = _line_status(line)
            if task_id is not None and task_id in drop:
                dropped += 1
                continue
            dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    if not dropped:
        tmp.unlink()
        return
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    log.info("%s: dropped %d records of tasks played again", path, dropped)


def _drop_partial_last_line(path: Path) -> None:
    """Before appending: a last line without its newline was cut by a crash unless it parses; fix either way."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # find the start of the last line, reading backwards in blocks
        pos, start = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                start = pos + nl + 1
                break
        f.seek(start)
        last = f.read()
        try:
            json.loads(last)
            f.seek(0, os.SEEK_END)
            f.write(b"\n")  # a complete record that only lacks its newline
        except ValueError:
            log.warning("%s: dropping a last line cut short (%d bytes) before appending", path, size - start)
            f.truncate(start)
