"""Writing trajectory files durably: TrajectoryWriter (JSONL or Parquet), append and resume.

Durability: a JSONL record is flushed as it is written. A Parquet writer writes its rows in complete, fsynced
part files under `<path>.parts/` as it goes, and merges them into `path` on close; a killed writer leaves
`path` plus parts that every reader (raysad.trajectory_reader: read_trajectories, read_task_ids,
count_trajectories) reads as one output, and the next writer merges. Rows still buffered when a process is
killed are lost, but they were never reported as written (a rollout re-plays them).

    with TrajectoryWriter("trajs.jsonl", append=True) as out:   # resume: skip read_task_ids(path)
        out.write(traj)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from raysad.trajectory import Trajectory, TrajectoryError, validate
from raysad.trajectory_files import (MERGED_PARTS_KEY, file_format, merged_parts, open_parquet, parquet_schema,
                                     parquet_sources, parse_parquet_row, parts_dir, to_parquet_row)
from raysad.trajectory_reader import line_status

log = logging.getLogger(__name__)


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

        self._schema = parquet_schema()
        self._parts = parts_dir(self.path)
        self._part_prefix = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._part_seq = 0
        if not self.append:  # start over: the old output goes now, so that a kill cannot mix old and new
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self._parts, ignore_errors=True)
        elif self._parts.is_dir():
            for stale in self._parts.glob("*.tmp"):  # a part whose write was killed: never counted
                stale.unlink(missing_ok=True)
            for merged in merged_parts(self.path):  # a merge killed before it deleted its parts
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
        self._buffer.append(to_parquet_row(d))
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

        sources = parquet_sources(self.path)
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
                    rows = [to_parquet_row(t.to_dict()) for t in _iter_file(source)
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
    with open_parquet(source) as pf:
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
            task_id, _ = line_status(line)
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
