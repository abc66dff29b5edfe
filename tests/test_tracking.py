"""raysad.tracking: how a stage's MLflow run ends (FINISHED, KILLED on Ctrl-C, FAILED on an error), also when a
resumed run is reopened."""
from __future__ import annotations

import contextlib

import pytest
from mlflow.tracking import MlflowClient

from raysad.tracking import resumable_run, start_run


@pytest.mark.parametrize("raised,status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"),
                                           (ValueError, "FAILED")])
def test_a_run_ends_with_the_status_of_what_stopped_it(tmp_path, raised, status):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = []
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with start_run("e", "r", {"a": 1}, uri=uri) as run:
            ids.append(run.info.run_id)
            if raised:
                raise raised
    assert MlflowClient(uri).get_run(ids[0]).info.status == status


def test_a_reopened_run_interrupted_again_ends_killed_and_finishes_on_the_next_try(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    id_file = tmp_path / "run_id"
    with pytest.raises(KeyboardInterrupt):
        with resumable_run(id_file, "e", uri, "r", {}, {}):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with resumable_run(id_file, "e", uri, "r", {}, {}) as run:
            assert run.info.run_id == id_file.read_text()
            raise KeyboardInterrupt
    assert MlflowClient(uri).get_run(id_file.read_text()).info.status == "KILLED"
    with resumable_run(id_file, "e", uri, "r", {}, {}):
        pass
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert only.info.run_id == id_file.read_text() and only.info.status == "FINISHED"



def test_experiments_open_on_the_runs_view_of_the_mlflow_ui(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("kinds", "r", uri=uri):
        pass
    assert MlflowClient(uri).get_experiment_by_name("kinds").tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_rerun_over_a_finished_output_is_a_new_run_when_asked(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    id_file = tmp_path / "run_id"
    with pytest.raises(KeyboardInterrupt):
        with resumable_run(id_file, "e", uri, "r", {}, {}, reopen_finished=False):
            raise KeyboardInterrupt
    first = id_file.read_text()
    with resumable_run(id_file, "e", uri, "r", {}, {}, reopen_finished=False) as run:
        assert run.info.run_id == first  # interrupted: continued
    with resumable_run(id_file, "e", uri, "r", {}, {}, reopen_finished=False) as run:
        assert run.info.run_id != first  # finished: a run of its own
    assert MlflowClient(uri).get_run(first).info.status == "FINISHED"
