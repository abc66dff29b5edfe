"""Reading trajectory files, streaming: a validating iterator (TrajectoryReader), shards that are read apart
(by Ray Data tasks), and cheap looks that parse nothing (task ids and their status, record counts).

Reading never holds more than one line (JSONL) or one row group (Parquet) in memory, so a million
trajectories read like ten. A Parquet output is read with the parts a killed writer left next to it
(raysad.trajectory_files), as one output.

    for traj in read_trajectories("trajs.jsonl"):
        ...
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from raysad.trajectory import Trajectory, TrajectoryError
from raysad.trajectory_files import (file_format, open_parquet, parquet_sources, parse_jsonl_line,
                                     parse_parquet_row)

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 20  # how many messages a skip_bad reader keeps in `.errors`


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
        if not (self.path.is_file() or (kind == "parquet" and parquet_sources(self.path))):
            raise TrajectoryError(f"{self.path}: no such file")
        self._gen = self._validated(self._jsonl_records() if kind == "jsonl" else self._parquet_records())

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

    def _validated(self, records: Iterator[tuple[Callable, Any, str]]) -> Iterator[Trajectory]:
        """Parse each (parser, raw record, where) into a Trajectory; a bad one raises or (skip_bad) is skipped."""
        count = 0
        with contextlib.closing(records):  # closing the reader closes the file at once
            for parse, raw, where in records:
                count += 1
                try:
                    traj = parse(raw, where)
                except TrajectoryError as err:
                    self._bad(err)
                    continue
                self.read += 1
                yield traj
        self._done(count)

    def _jsonl_records(self) -> Iterator[tuple[Callable, bytes, str]]:
        with open(self.path, "rb") as f:  # bytes, decoded per line: a decode error names its line
            for line_no, raw in enumerate(f, 1):
                if raw.strip():  # blank lines are allowed (and not records)
                    yield parse_jsonl_line, raw, f"{self.path}:{line_no}"

    def _parquet_records(self) -> Iterator[tuple[Callable, dict, str]]:
        row_no = 0
        for source in parquet_sources(self.path):  # the file, then the parts a killed writer left
            with open_parquet(source) as pf:
                for batch in pf.iter_batches(batch_size=self.batch_size):
                    for row in batch.to_pylist():
                        row_no += 1
                        yield parse_parquet_row, row, f"{self.path}:row {row_no}"


def read_trajectories(path: str | Path, skip_bad: bool = False) -> TrajectoryReader:
    """Stream the trajectories of a .jsonl/.json/.parquet file (see TrajectoryReader for skip_bad)."""
    return TrajectoryReader(path, skip_bad=skip_bad)


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
        sources = parquet_sources(path)
        if not sources:
            raise TrajectoryError(f"{path}: no such file")
        for source in sources:
            with open_parquet(source) as pf:
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
    with open_parquet(Path(shard["source"])) as pf:
        for row in pf.read_row_group(shard["row_group"]).to_pylist():
            row_no += 1
            yield parse_parquet_row(row, f"{shard['path']}:row {row_no}")


# --- cheap looks: task ids and counts without parsing records ----------------------------------------------

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

        for source in parquet_sources(path):
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
            task_id, error = line_status(line)
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


def line_status(line: str) -> tuple[str | None, bool]:
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
        for source in parquet_sources(path):
            with pq.ParquetFile(source) as pf:
                total += pf.metadata.num_rows
        return total
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
