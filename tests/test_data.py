"""raysad.data: shards read like the file, Ray Data encodes what the in-process path encodes, and a run that
streams its examples to Ray Train workers trains exactly like the in-process run on the same order and seed.

The Ray runs use the tiny teacher data of test_distill (8 HotPotQA expert trajectories with stored top-k),
cut into shards of 3 records and gather tasks of 3 rows, so every step reads across blocks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from raysad import data as rdata
from raysad import data_stream as rstream
from raysad import models
from raysad.distill import run_distill
from raysad.train_loop import load_tokenizer, tokenizer_source
from raysad.agent_formats import FormatError, format_record, get_format, trajectory_format
from raysad.trajectory import Trajectory, Turn
from raysad.trajectory_reader import read_shard, read_trajectories, shards
from raysad.trajectory_writer import TrajectoryWriter
from test_distill import config, data, losses, one_thread  # noqa: F401 - the fixtures used here


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(rstream, "RECORDS_PER_SHARD", 3)
    monkeypatch.setattr(rstream, "ROWS_PER_GATHER", 3)


def test_shards_read_like_the_whole_file(data, tmp_path):
    trajs = list(read_trajectories(data / "topk.jsonl"))
    spaced = tmp_path / "spaced.jsonl"  # blank lines are not records, and lines still count
    spaced.write_text("\n" + "\n\n".join((data / "topk.jsonl").read_text().splitlines()) + "\n\n")
    parquet = tmp_path / "t.parquet"
    with TrajectoryWriter(parquet, row_group_size=3) as out:
        for traj in trajs:
            out.write(traj)
    for path in (data / "topk.jsonl", spaced, parquet):
        pieces = shards(path, records_per_shard=3)
        assert [p["first_record"] for p in pieces] == [0, 3, 6]
        read = [t for piece in pieces for t in read_shard(piece)]
        assert [t.to_dict() for t in read] == [t.to_dict() for t in trajs]


def test_a_bad_record_is_named_by_its_line(data, tmp_path):
    lines = (data / "topk.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"turns"', '"turnz"', 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    pieces = shards(bad, records_per_shard=3)
    with pytest.raises(Exception, match=rf"{bad}:5"):
        [t for piece in pieces for t in read_shard(piece)]


def test_a_trajectory_is_encoded_in_the_format_it_records(data, tmp_path):
    # an env whose format is a YAML file: the trajectory carries the format, the file is not needed later
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text((Path(rdata.__file__).parent / "formats" / "example_reasoning_action.yaml").read_text())
    fmt = get_format(yaml_path)
    yaml_path.unlink()
    traj = Trajectory(id="m-0", env="my-agent", task_id="0", split="train", instruction="", prompt="Find it.\n",
                      turns=[Turn("I should look.", "Action: search[it]", "found it"),
                             Turn("Done.", "Answer: it", "")],
                      reward=1.0, success=True, policy={"backend": "expert", "model": "expert"},
                      extra={"agent_format": format_record(fmt)})
    path = tmp_path / "mine.jsonl"
    with TrajectoryWriter(path) as out:
        out.write(traj)
    (read,) = read_trajectories(path)
    assert trajectory_format(read) == fmt and format_record(get_format("hotpotqa")) == "hotpotqa"
    cfg = config(data, tmp_path / "s", trajectories=str(path), method="sft")
    tokenizer = load_tokenizer(cfg)
    (example,) = rdata.load_examples(cfg, tokenizer)
    reason = tokenizer.decode(example["input_ids"][example["reason_mask"]])
    act = tokenizer.decode(example["input_ids"][example["act_mask"]])
    assert "look" in reason and "Reasoning" not in reason and "search" in act and "Answer" in act
    del read.extra["agent_format"]  # a file from before formats were recorded, of an env with no built-in one
    with pytest.raises(FormatError, match="'m-0'.*records no agent_format"):
        trajectory_format(read)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ray_data_encodes_what_this_process_encodes(data, tmp_path, ray_cluster, suffix):
    cfg = config(data, tmp_path, method="sad")
    if suffix == ".parquet":  # row groups of 3 records: the shards are the row groups
        parquet = tmp_path / "topk.parquet"
        with TrajectoryWriter(parquet, row_group_size=3) as out:
            for traj in read_trajectories(data / "topk.jsonl"):
                out.write(traj)
        cfg = dataclasses.replace(cfg, trajectories=str(parquet))
    examples, here = rdata.load_examples_and_stats(cfg, load_tokenizer(cfg))
    cluster = rstream.encode_on_cluster(cfg, tokenizer_source(cfg))
    assert cluster.stats.counts == here.counts
    for name in ("loss_reason", "loss_act", "tokens", "complexity", "has_topk"):
        np.testing.assert_array_equal(getattr(cluster.stats, name), getattr(here, name))
    assert len(set(cluster.block_of.tolist())) == 3  # 8 records in shards of 3
    # every rank's stream holds its examples in step order, byte for byte
    batches = [[5, 2, 7], [0, 1], [3]]
    streams = rstream.rank_datasets(cluster, batches, world=2)
    for rank in (0, 1):
        got = list(rstream.stream_examples(streams[f"rank_{rank}"]))
        want = [examples[i] for i in rdata.rank_sequence(batches, rank, 2)]
        assert len(got) == len(want) == (4 if rank == 0 else 3)  # rank 1 has no example at step 2: a filler
        for a, b in zip(got, want):
            for key in ("input_ids", "reason_mask", "act_mask", "topk_ids", "topk_logprobs", "topk_mask"):
                np.testing.assert_array_equal(a[key], b[key])


def test_a_stream_that_ends_early_says_where():
    assert rdata.take(iter(range(5)), 3, "rank 0, step 1") == [0, 1, 2]
    assert rdata.take(iter(range(5)), 5, "rank 0", keep=False) == []
    with pytest.raises(RuntimeError, match="rank 1, step 7: the rank's example stream ended 2 example"):
        rdata.take(iter(range(3)), 5, "rank 1, step 7")


def test_micro_batches_take_the_longest_first_and_keep_every_example():
    items = [{"input_ids": [0] * n, "n": i} for i, n in enumerate([5, 9, 2, 9, 7])]
    split = rdata.micro_batches(items, size=2, count=4)
    assert [[len(x["input_ids"]) for x in m] for m in split] == [[9, 9], [7, 5], [2], []]
    assert sorted(x["n"] for m in split for x in m) == [0, 1, 2, 3, 4]
    # padded positions: 18 + 14 + 2 = 34 sorted, against 18 + 18 + 7 = 43 in the given order
    assert sum(rdata.padded_positions(m) for m in split) == 34
    assert sum(rdata.padded_positions(items[i:i + 2]) for i in (0, 2, 4)) == 43


@pytest.mark.usefixtures("small_blocks")
def test_a_bad_record_fails_the_cluster_encode_naming_its_line(data, tmp_path, ray_cluster):
    lines = (data / "topk.jsonl").read_text().splitlines()
    lines[6] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = config(data, tmp_path, trajectories=str(bad))
    with pytest.raises(ValueError, match=rf"^{bad}:7: invalid JSON"):
        rstream.encode_on_cluster(cfg, tokenizer_source(cfg))


def _same_weights(a, b, atol):
    a = models.load_model(a.out, device="cpu").state_dict()
    b = models.load_model(b.out, device="cpu").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("overrides", [dict(method="sad", lambda_act=2.0),
                                       dict(method="sft", curriculum=True, epochs=3, max_steps=0, batch_size=3)],
                         ids=["sad-stored-topk", "sft-curriculum"])
def test_streamed_run_trains_like_the_in_process_run(data, tmp_path, ray_cluster, overrides):
    # the old path: every example in a list in this process; the new: Ray Data blocks streamed to a Train worker
    base = {**dict(batch_size=4, micro_batch_size=2, max_steps=5, checkpoint_every=100), **overrides}
    in_process = run_distill(config(data, tmp_path / "list", workers=0, **base), track=False)
    streamed = run_distill(config(data, tmp_path / "stream", workers=1, **base), track=False)
    assert len(streamed.log) == len(in_process.log) >= 5
    assert losses(streamed) == pytest.approx(losses(in_process), rel=1e-6, abs=1e-6)
    assert losses(streamed, "tokens") == losses(in_process, "tokens")
    _same_weights(streamed, in_process, atol=1e-6)
    assert streamed.metrics["data/examples"] == in_process.metrics["data/examples"] == 8


@pytest.mark.usefixtures("small_blocks")
def test_a_resumed_run_streams_from_its_checkpoint(data, tmp_path, ray_cluster):
    run = config(data, tmp_path / "r", workers=1, batch_size=3, micro_batch_size=2, max_steps=6, checkpoint_every=3,
                 resume=True)
    # (the reference in this process: test_streamed_run_trains_like_the_in_process_run shows the two agree)
    straight = run_distill(dataclasses.replace(run, out=str(tmp_path / "straight"), workers=0), track=False)
    # the run dies after step 4 (its last checkpoint: step 3); the rerun streams from step 3 on
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distill(dataclasses.replace(run, fail_once_at_step=5, max_failures=0), track=False)
    resumed = run_distill(run, track=False)
    assert [line["step"] for line in resumed.log] == list(range(6))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    _same_weights(resumed, straight, atol=1e-6)
