"""MLflow set-up in one place, shared by every stage: where runs go, one run per stage, metric logging.

Runs go to `tracking_uri()`: the stage config's value, else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db`
in the working directory (MLflow 3 refuses a plain file store unless told, sqlite needs no server).
A stage started while another run is active (quickstart, tune) becomes a nested run under it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from raysad.config import redact

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_PARAM_MAX_CHARS = 6000  # MLflow's limit on one param value


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri` (from a config) if given, else $MLFLOW_TRACKING_URI, else sqlite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str | None = None) -> str:
    """tracking_uri(uri), with a relative sqlite/file store made absolute (workers and trials run in other
    working directories)."""
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, nested: bool = False,
              uri: str | None = None) -> Iterator[Any]:
    """An MLflow run in `experiment` with `params` (a flattened config) logged; yields the mlflow Run.

    Nested under the active run when one exists (or when `nested`); ended KILLED on Ctrl-C, FAILED if the body
    raises anything else.
    """
    import mlflow

    from raysad.locks import setup_lock, sqlite_path

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    parent = mlflow.active_run()
    db = sqlite_path(uri)
    # processes starting together on one sqlite file would race creating its tables and the experiment
    # ("table ... already exists"): one at a time, under a lock file next to the DB
    with setup_lock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext():
        if parent is None:  # a nested run stays in its parent's experiment
            use_experiment(experiment)
        active = mlflow.start_run(run_name=run_name, nested=nested or parent is not None, tags=tags)
    with _killed_on_interrupt(active) as run:
        if params:
            params = redact(params)  # secrets (api_key, token, ...) never reach the params or config.json
            # an unset field is no param (MLflow would store the string 'None'); config.json keeps it as null
            mlflow.log_params({k: _param_value(v) for k, v in params.items() if v is not None})
            mlflow.log_dict({k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                             for k, v in params.items()}, "config.json")
        yield run


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: the runs/metrics view


def use_experiment(name: str):
    """mlflow.set_experiment, the experiment tagged as model development: MLflow 3's UI opens an untagged
    experiment on its GenAI (traces) view, where runs, params and metrics are one click away."""
    import mlflow

    experiment = mlflow.set_experiment(name)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) is None:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment


@contextlib.contextmanager
def _killed_on_interrupt(active) -> Iterator[Any]:
    """`with active_run`, but a run stopped by Ctrl-C ends KILLED (MLflow's own exit says FAILED for it)."""
    import mlflow

    with active as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def resumable_run(id_file: Path, experiment: str, uri: str, name: str, params: dict, tags: dict,
                  reopen_finished: bool = True):
    """A new MLflow run whose id is kept in `id_file`, or, when that file exists (a resumed sweep or a retried
    trial), the same run reopened (with reopen_finished=False, only a run that did not finish: a rerun over a
    finished output is a new run). Ended FINISHED, KILLED on Ctrl-C, or FAILED if the body raises."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            if mlflow.MlflowClient(uri).get_run(run_id).info.status == "FINISHED" and not reopen_finished:
                run_id = None
        except MlflowException:  # recorded in another store (--tracking-uri changed): a new run
            run_id = None
        if run_id:
            use_experiment(experiment)
            return _killed_on_interrupt(mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None))

    @contextlib.contextmanager
    def new_run():
        with start_run(experiment, name, params, tags=tags, uri=uri) as run:
            id_file.write_text(run.info.run_id)
            yield run
    return new_run()


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log `stage/metric` values to the active run (values that are not numbers, such as None, are skipped)."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_MAX_CHARS else text[: _PARAM_MAX_CHARS - 3] + "..."


def log_text(text: str, artifact_file: str) -> None:
    """A small text artifact (sample trajectories, a summary) on the active run; callers redact() what
    they serialise into it."""
    import mlflow

    mlflow.log_text(text, artifact_file)
