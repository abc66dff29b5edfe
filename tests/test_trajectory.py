"""Trajectory schema, JSONL/Parquet round trips, validation errors (file:line:field), streaming, resume."""
from __future__ import annotations

import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysad.trajectory import Trajectory, TrajectoryError, Turn
from raysad.trajectory_reader import count_trajectories, read_task_ids, read_trajectories
from raysad.trajectory_writer import TrajectoryWriter


def make_traj(n: int = 0, with_tokens: bool = True) -> Trajectory:
    generated = Turn(
        thought="I should search Colorado orogeny.", action="Search[Colorado orogeny]",
        observation="The Colorado orogeny was an episode of mountain building (an orogeny) in Colorado.",
        token_ids=[11, 12, 13, 14, 15], num_thought_tokens=2,
        # values exact in float32, so the Parquet round trip compares equal
        topk_ids=[[11, 3], [12, 4], [13, 5], [14, 6], [15, 7]],
        topk_logprobs=[[-0.25, -1.5], [-0.5, -1.0], [0.0, -20.0], [-0.125, -2.25], [-0.75, -0.875]],
        extra={"latency_s": 0.5, "admissible": ["look", "inventory"]})
    plain = Turn(thought="", action="Finish[1,800 to 7,000 ft]", observation="Episode finished — caf\u00e9 \u2713")
    return Trajectory(
        id=f"traj-{n}", env="hotpotqa", task_id=f"task-{n}", split="train",
        instruction="What is the elevation range?", prompt="Question: What is the elevation range?\n",
        turns=[generated, plain] if with_tokens else [plain], reward=1.0, success=True,
        policy={"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct"},
        extra={"error": None, "seed": 7, "meta": {"nested": [1, 2]}})


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_round_trip_keeps_tokens_topk_and_unknown_fields(tmp_path, suffix):
    path = tmp_path / f"trajs.{suffix}"
    trajs = [make_traj(0), make_traj(1, with_tokens=False), make_traj(2)]
    with TrajectoryWriter(path) as out:
        for t in trajs:
            out.write(t)
    assert out.count == 3
    back = list(read_trajectories(path))
    assert back == trajs
    assert back[0].turns[0].extra == {"latency_s": 0.5, "admissible": ["look", "inventory"]}
    assert back[0].extra == {"error": None, "seed": 7, "meta": {"nested": [1, 2]}}
    assert count_trajectories(path) == 3
    assert read_task_ids(path) == {"task-0", "task-1", "task-2"}


def test_unknown_fields_are_written_back_flat(tmp_path):
    path = tmp_path / "trajs.jsonl"
    with TrajectoryWriter(path) as out:
        out.write(make_traj(0))
    d = json.loads(path.read_text().splitlines()[0])
    assert list(d)[:3] == ["id", "env", "task_id"]
    assert d["seed"] == 7 and "extra" not in d
    assert d["turns"][0]["latency_s"] == 0.5
    assert "token_ids" not in d["turns"][1]  # optional fields are omitted when absent


def test_foreign_unknown_fields_survive_a_round_trip(tmp_path):
    d = make_traj(0).to_dict()
    d["rollout_host"] = "node-3"
    d["turns"][1]["reward"] = 0.25
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    src.write_text(json.dumps(d) + "\n")
    with TrajectoryWriter(dst) as out:
        for t in read_trajectories(src):
            out.write(t)
    (back,) = read_trajectories(dst)
    assert back.to_dict() == d


def _write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.mark.parametrize("mutate, field_, problem", [
    (lambda d: d["turns"].__setitem__(1, {**d["turns"][1], "action": 3}), "turns[1].action", "expected str, got int"),
    (lambda d: d.pop("reward"), "reward", "missing"),
    (lambda d: d.__setitem__("reward", "1.0"), "reward", "expected float, got str"),
    (lambda d: d.__setitem__("success", 1), "success", "expected bool, got int"),
    (lambda d: d.__setitem__("turns", "Search[x]"), "turns", "expected a list, got str"),
    (lambda d: d["turns"][1].pop("action"), "turns[1].action", "missing"),
    (lambda d: d["turns"][0].__setitem__("observation", None), "turns[0].observation", "expected str, got null"),
    (lambda d: d["turns"][0]["token_ids"].__setitem__(3, "x"), "turns[0].token_ids[3]", "expected int, got str"),
    (lambda d: d["turns"][0].pop("num_thought_tokens"), "turns[0].num_thought_tokens",
     "missing (required with token_ids)"),
    (lambda d: d["turns"][0].__setitem__("num_thought_tokens", 9), "turns[0].num_thought_tokens",
     "9 is outside 0..5 (the number of token_ids)"),
    (lambda d: d["turns"][0]["topk_logprobs"].pop(), "turns[0].topk_logprobs",
     "expected 5 rows (one per token id), got 4"),
    (lambda d: d["turns"][0]["topk_logprobs"][2].pop(), "turns[0].topk_logprobs[2]",
     "expected 2 entries (as topk_ids[2]), got 1"),
    (lambda d: d["turns"][0].pop("topk_ids"), "turns[0].topk_ids", "missing (topk_ids and topk_logprobs go together)"),
    (lambda d: d.__setitem__("policy", "vllm"), "policy",
     'expected an object like {"backend": ..., "model": ...}, got str'),
])
def test_bad_field_names_file_line_and_field(tmp_path, mutate, field_, problem):
    path = tmp_path / "trajs.jsonl"
    bad = make_traj(6).to_dict()
    mutate(bad)
    _write_lines(path, [make_traj(i).to_dict() for i in range(6)] + [bad])
    reader = read_trajectories(path)
    for _ in range(6):
        next(reader)
    with pytest.raises(TrajectoryError) as err:
        next(reader)
    assert str(err.value) == f"{path}:7: field '{field_}': {problem}"


def test_malformed_json_and_non_objects_name_the_line(tmp_path):
    path = tmp_path / "trajs.jsonl"
    _write_lines(path, [make_traj(0).to_dict(), '{"id": "x", "env": ', "[1, 2]"])
    with pytest.raises(TrajectoryError, match=rf"^{path}:2: invalid JSON: .*column"):
        list(read_trajectories(path))
    _write_lines(path, [make_traj(0).to_dict(), "[1, 2]"])
    with pytest.raises(TrajectoryError) as err:
        list(read_trajectories(path))
    assert str(err.value) == f"{path}:2: expected a JSON object, got list"


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "trajs.jsonl"
    path.write_text(content)
    with pytest.raises(TrajectoryError) as err:
        list(read_trajectories(path, skip_bad=True))
    assert str(err.value) == f"{path}: empty file (no trajectories)"


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(TrajectoryError, match="no such file"):
        read_trajectories(tmp_path / "nope.jsonl")
    with pytest.raises(TrajectoryError, match=r"unknown trajectory file type '\.csv'"):
        read_trajectories(tmp_path / "trajs.csv")


def test_skip_bad_counts_and_keeps_messages(tmp_path):
    path = tmp_path / "trajs.jsonl"
    bad = make_traj(9).to_dict()
    bad["reward"] = "high"
    _write_lines(path, [make_traj(0).to_dict(), "{oops", make_traj(1).to_dict(), "", bad, make_traj(2).to_dict()])
    reader = read_trajectories(path, skip_bad=True)
    assert [t.id for t in reader] == ["traj-0", "traj-1", "traj-2"]
    assert reader.skipped == 2 and reader.read == 3
    assert reader.errors[0].startswith(f"{path}:2: invalid JSON")
    assert reader.errors[1] == f"{path}:5: field 'reward': expected float, got str"


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "trajs.parquet"
    with TrajectoryWriter(path) as out:
        for i in range(5):
            out.write(make_traj(i))
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[3]["turns"][1]["action"] = None  # a foreign writer let a null through
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    with pytest.raises(TrajectoryError) as err:
        list(read_trajectories(path))
    assert str(err.value) == f"{path}:row 4: field 'turns[1].action': expected str, got null"
    reader = read_trajectories(path, skip_bad=True)
    assert len(list(reader)) == 4 and reader.skipped == 1

    pq.write_table(table.drop_columns(["reward"]), path)  # a column missing altogether
    with pytest.raises(TrajectoryError) as err:
        next(read_trajectories(path))
    assert str(err.value) == f"{path}:row 1: field 'reward': missing"

    path.write_bytes(b"PAR1 not really")
    with pytest.raises(TrajectoryError, match=rf"^{path}: not a readable Parquet file"):
        list(read_trajectories(path))


def test_writer_rejects_bad_trajectories_before_writing(tmp_path):
    path = tmp_path / "trajs.jsonl"
    bad = make_traj(0)
    bad.turns[0].action = None
    with TrajectoryWriter(path) as out:
        out.write(make_traj(1))
        with pytest.raises(TrajectoryError, match=r"trajectory 2 \(id='traj-0'\): field 'turns\[0\]\.action'"):
            out.write(bad)
    assert [t.id for t in read_trajectories(path)] == ["traj-1"]


def test_jsonl_append_and_resume_after_a_crash(tmp_path):
    path = tmp_path / "trajs.jsonl"
    with TrajectoryWriter(path) as out:
        for i in range(3):
            out.write(make_traj(i))
    cut = json.dumps(make_traj(3).to_dict())[:120]  # the process died in the middle of this line
    with open(path, "a") as f:
        f.write(cut)
    assert read_task_ids(path) == {"task-0", "task-1", "task-2"}  # the cut line's task is not "done"
    with TrajectoryWriter(path, append=True) as out:
        out.write(make_traj(3))
    assert [t.id for t in read_trajectories(path)] == ["traj-0", "traj-1", "traj-2", "traj-3"]
    assert count_trajectories(path) == 4
    assert read_task_ids(tmp_path / "missing.jsonl") == set() and count_trajectories(tmp_path / "m.parquet") == 0


def test_parquet_append_keeps_old_rows_and_an_exception_keeps_written_rows(tmp_path):
    path = tmp_path / "trajs.parquet"
    with TrajectoryWriter(path, row_group_size=2) as out:
        for i in range(5):
            out.write(make_traj(i))
    assert pq.ParquetFile(path).metadata.num_row_groups == 3  # buffered into row groups of 2
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(path, append=True) as out:
            out.write(make_traj(5))
            raise RuntimeError("rollout worker died")
    assert [t.id for t in read_trajectories(path)] == [f"traj-{i}" for i in range(6)]
    assert not (tmp_path / "trajs.parquet.partial").exists()
    with TrajectoryWriter(path) as out:  # append=False starts over
        out.write(make_traj(9))
    assert [t.id for t in read_trajectories(path)] == ["traj-9"]


def test_reading_streams_instead_of_loading_everything(tmp_path):
    n = 20_000
    path = tmp_path / "many.jsonl"
    with TrajectoryWriter(path) as out:
        for i in range(n):
            out.write(Trajectory(id=str(i), env="alfworld", task_id=f"t{i % 500}", split="train",
                                 instruction="put a clean mug on the desk", prompt="You are in a room.\n",
                                 turns=[Turn("", "go to desk 1", "On the desk 1, you see a mug 1.")],
                                 reward=0.0, success=False, policy={"backend": "expert", "model": ""}))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_trajectories(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n == count_trajectories(path)
    # all of them as Python objects would take several times the file size; streaming holds one line
    assert peak < size / 10, (peak, size)
    assert len(read_task_ids(path)) == 500
