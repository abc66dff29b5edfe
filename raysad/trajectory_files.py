"""A trajectory file on disk: its format (JSONL or Parquet), the Parquet row layout and part files, and the
parsing of one record (a JSONL line, a Parquet row) into a validated Trajectory.

A trajectory file is either JSON lines (`.jsonl` or `.json`, one trajectory per line) or Parquet
(`.parquet`, one trajectory per row). A Parquet output is `path` plus, while a writer runs (or after it was
killed), complete part files under `<path>.parts/` (see raysad.trajectory_writer); readers take both as one.
"""
from __future__ import annotations

import json
from pathlib import Path

from raysad.trajectory import (TRAJECTORY_FIELDS, TURN_FIELDS, TURN_OPTIONAL_FIELDS, Trajectory, TrajectoryError,
                               field_error)

MERGED_PARTS_KEY = b"raysad.merged_parts"  # Parquet metadata of a merged file: the part files it holds


def file_format(path: str | Path) -> str:
    """'jsonl' for .jsonl/.json (JSON lines), 'parquet' for .parquet."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise TrajectoryError(f"{path}: unknown trajectory file type {suffix!r}; use .jsonl (or .json lines) or .parquet")


def parquet_schema():
    """The Arrow schema of our Parquet rows (dict-valued fields as JSON strings)."""
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


def to_parquet_row(d: dict) -> dict:
    """A trajectory's flat JSON form as one row of parquet_schema()."""
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
                raise field_error(where, name, f"invalid JSON: {err}") from None
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
                        raise field_error(where, f"turns[{i}].extra", f"invalid JSON: {err}") from None
            turns.append(t)
        d["turns"] = turns
    if isinstance(extra, dict):
        d.update({k: v for k, v in extra.items() if k not in d})
    return d


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


def open_parquet(source: Path):
    """A pyarrow ParquetFile, or a TrajectoryError naming the file when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a truncated or foreign file
        raise TrajectoryError(f"{source}: not a readable Parquet file: {err}") from None


# --- Parquet parts ---------------------------------------------------------------------------------------

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


def merged_parts(path: Path) -> set[str]:
    """The part files a merged Parquet `path` already holds (its metadata), so they are not read twice."""
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


def parquet_sources(path: str | Path) -> list[Path]:
    """The files of a Parquet output, in order: `path` (if any), then the complete parts a killed writer left
    in `<path>.parts/` that `path` does not already hold (a merge killed before deleting them)."""
    path = Path(path)
    sources = [path] if path.is_file() else []
    parts = parts_dir(path)
    if parts.is_dir():
        merged = merged_parts(path)
        sources += sorted(p for p in parts.glob("part-*.parquet") if p.name not in merged)
    return sources
