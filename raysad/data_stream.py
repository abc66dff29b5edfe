"""Training data on a Ray cluster: the trajectories read and encoded by Ray Data tasks, and each Train rank's
stream of its examples in step order (the driver holds no example; raysad.data has the rest of the story).

    source = encode_on_cluster(config, tokenizer_source)        # blocks in the object store + per-example stats
    batches = data.step_batches(source.stats, config)           # [step] -> example positions
    datasets = rank_datasets(source, batches, world=2)          # {"rank_0": Dataset, ...}: TorchTrainer(datasets=)
    for example in stream_examples(ray.train.get_dataset_shard("rank_0")): ...

The file is cut into shards (raysad.trajectory_reader.shards: JSONL byte ranges, Parquet row groups); a
flat_map task encodes each into a block. Per-block statistics are read in tasks next to the blocks, so the
driver maps no block into its memory. A rank's stream is gathered from the blocks by tasks that reserve no CPU
(they run while the Train workers hold every CPU) and keeps the step order (`preserve_order` on that dataset).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from raysad.data import STAT_FIELDS, DataStats, Example, encode_all, rank_sequence, summarize

RECORDS_PER_SHARD = 512   # trajectories per Ray Data read+encode task (each block costs the driver ~0.1 MB of Ray metadata)
ROWS_PER_GATHER = 64      # examples per Ray Data gather task of a rank's stream
PREFETCH_GATHERS = 4      # gather results a rank's stream keeps ready


ARRAY_COLUMNS = ("input_ids", "reason_mask", "act_mask", "topk_ids", "topk_logprobs", "topk_mask")


def to_row(example: dict) -> dict:
    """An example as a flat row of scalars and bytes (one Arrow type for every block, whatever the lengths);
    the top-k matrix is flattened, its width in topk_k (-1: no top-k stored)."""
    has = example.get("topk_ids") is not None
    n = len(example["input_ids"])
    return {"input_ids": np.asarray(example["input_ids"], dtype=np.int64).tobytes(),
            "reason_mask": np.asarray(example["reason_mask"], dtype=bool).tobytes(),
            "act_mask": np.asarray(example["act_mask"], dtype=bool).tobytes(),
            "topk_k": (int(np.asarray(example["topk_ids"]).shape[1]) if n else 0) if has else -1,
            "topk_ids": np.asarray(example["topk_ids"], dtype=np.int64).tobytes() if has else b"",
            "topk_logprobs": np.asarray(example["topk_logprobs"], dtype=np.float32).tobytes() if has else b"",
            "topk_mask": np.asarray(example["topk_mask"], dtype=bool).tobytes() if has else b""}


def from_row(row: dict) -> dict:
    """The example of a to_row row (writable arrays of its own)."""
    def array(name, dtype):
        return np.frombuffer(row[name], dtype=dtype).copy()

    ids = array("input_ids", np.int64)
    example = {"input_ids": ids, "reason_mask": array("reason_mask", bool), "act_mask": array("act_mask", bool),
               "topk_ids": None, "topk_logprobs": None, "topk_mask": None}
    k = int(row["topk_k"])
    if k >= 0:
        example["topk_ids"] = array("topk_ids", np.int64).reshape(len(ids), k)
        example["topk_logprobs"] = array("topk_logprobs", np.float32).reshape(len(ids), k)
        example["topk_mask"] = array("topk_mask", bool)
    return example


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str):
    from raysad import models

    return models.load_tokenizer(source)


def encode_shard(shard: dict, tokenizer_source: str, config) -> list[dict]:
    """Ray Data task: the rows (example + statistics) of one shard. A bad record becomes one `error` row (the
    driver raises it, naming file and line) rather than a task failure Ray would retry and wrap."""
    from raysad.trajectory import TrajectoryError
    from raysad.trajectory_reader import read_shard

    rows = []
    try:
        for example, stats in encode_all(read_shard(shard), _tokenizer(tokenizer_source), config,
                                         shard["first_record"]):
            rows.append({**stats, "error": "", **to_row(example)})
    except (TrajectoryError, ValueError) as err:
        return [{**_ERROR_STATS, "index": shard["first_record"], "error": str(err),
                 **to_row(_EMPTY_EXAMPLE)}]
    return rows


_EMPTY_EXAMPLE = {"input_ids": np.zeros(0, np.int64), "reason_mask": np.zeros(0, bool),
                  "act_mask": np.zeros(0, bool), "topk_ids": None, "topk_logprobs": None, "topk_mask": None}
_ERROR_STATS = {**dict.fromkeys(STAT_FIELDS, 0), "skipped": True, "complexity": 0.0, "has_topk": False}


@dataclass
class ClusterData:
    """Examples held by Ray: blocks in the object store; the driver has their references, where each example
    sits (block, row) and DataStats."""
    blocks: list          # ObjectRef[pyarrow.Table] per block
    block_of: np.ndarray  # [examples] block number
    row_of: np.ndarray    # [examples] row in that block
    stats: DataStats


def quiet_ray_data() -> None:
    """No progress bars or per-dataset banners from Ray Data (raysad prints its own progress)."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # first: setting the context logs at INFO
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def encode_on_cluster(config, tokenizer_source: str) -> ClusterData:
    """Read and encode config.trajectories with Ray Data tasks (needs a connected Ray); the examples stay in
    the object store. Raises the first bad record's error (file:line: field) or the data checks' errors."""
    import ray
    import ray.data

    from raysad.trajectory_reader import shards

    quiet_ray_data()
    pieces = shards(config.trajectories, RECORDS_PER_SHARD)
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # the blocks' order does not matter: each example is found by (block, row), sorted by its index below
    dataset = (ray.data.from_items(pieces, override_num_blocks=len(pieces))
               .flat_map(encode_shard, fn_args=(tokenizer_source, _light_config(config)),
                         num_cpus=0, compute=ray.data.TaskPoolStrategy(size=workers))
               .materialize())
    blocks = dataset.to_arrow_refs()
    # each block's statistics are read in a task next to it: the driver never maps a block into its memory,
    # and keeps a few compact numbers per example
    block_stats = ray.remote(num_cpus=0)(_block_stats)
    parts: dict[str, list] = {name: [] for name in (*STAT_FIELDS, "block", "row")}
    errors: list[tuple[int, str]] = []
    for b, (stats, bad) in enumerate(ray.get([block_stats.remote(ref) for ref in blocks])):
        for name, values in stats.items():
            parts[name].append(values)
        parts["block"].append(np.full(len(stats["index"]), b, dtype=np.int32))
        parts["row"].append(np.arange(len(stats["index"]), dtype=np.int32))
        errors += bad
    if errors:
        raise ValueError(min(errors)[1])  # the first bad record of the file
    order = np.argsort(np.concatenate(parts["index"]), kind="stable")  # the file's order, whatever the blocks'
    columns = {}
    for name in list(parts):
        columns[name] = np.concatenate(parts.pop(name))[order]
    stats = summarize(columns, config.trajectories, config.max_length)
    kept = ~columns["skipped"].astype(bool)
    return ClusterData(blocks, columns["block"][kept], columns["row"][kept], stats)


def _block_stats(table) -> tuple[dict[str, np.ndarray], list[tuple[int, str]]]:
    """Ray task: the per-example statistics of one encoded block (compact dtypes; complexity stays float64, so
    the curriculum's order is the in-process one), and its bad records as (index, message)."""
    stats = {}
    for name in STAT_FIELDS:
        values = table.column(name).to_numpy(zero_copy_only=False)
        if values.dtype == np.int64 and name != "index":
            values = values.astype(np.int32)
        stats[name] = values
    errors = [(i, e) for i, e in zip(stats["index"].tolist(), table.column("error").to_pylist()) if e]
    return stats, errors


def _light_config(config):
    """The fields encode_all reads, as a plain object (what ships to every task)."""
    from types import SimpleNamespace

    return SimpleNamespace(method=config.method, teacher=getattr(config, "teacher", None),
                           max_length=config.max_length)


def _gather(batch, blocks):
    """Ray Data task: the examples at (block, row) in the given order, as one Arrow table."""
    import pyarrow as pa
    import ray

    tables: dict[int, Any] = {}
    pieces = []
    for b, r in zip(batch["block"].to_pylist(), batch["row"].to_pylist()):
        if b not in tables:
            tables[b] = ray.get(blocks[b]).select(["index", "topk_k", *ARRAY_COLUMNS])
        pieces.append(tables[b].slice(r, 1))
    return pa.concat_tables(pieces)


def rank_datasets(data: ClusterData, batches: list[list[int]], world: int, start: int = 0) -> dict[str, Any]:
    """{"rank_<r>": Dataset} for r < world: rank r's examples from step `start` on, in step order (each a lazy
    Ray Data stream: gather tasks that reserve no CPU, so they run beside Train workers holding every CPU)."""
    import pyarrow as pa
    import ray.data

    out = {}
    for rank in range(world):
        sequence = np.asarray(rank_sequence(batches, rank, world, start), dtype=np.int64)
        tables = [pa.table({"block": data.block_of[sequence[i:i + ROWS_PER_GATHER]],
                            "row": data.row_of[sequence[i:i + ROWS_PER_GATHER]]})
                  for i in range(0, len(sequence), ROWS_PER_GATHER)]
        stream = ray.data.from_arrow(tables).map_batches(
            _gather, fn_args=(data.blocks,), batch_format="pyarrow", batch_size=None, num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=2))
        stream.context.execution_options.preserve_order = True  # the stream's order is the step order
        out[f"rank_{rank}"] = stream
    return out


def stream_examples(source) -> Iterator[Example]:
    """The examples of a rank's stream (its Dataset, or the DataIterator ray.train.get_dataset_shard gives),
    gather results prefetched while the rank trains."""
    for table in source.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=PREFETCH_GATHERS):
        for row in table.to_pylist():
            yield from_row(row)


def ingest_options():
    """Ray Train's ingest options, with the stream's order kept (it is the step order)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)
