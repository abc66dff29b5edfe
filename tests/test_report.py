"""`raysad report` on real MLflow runs in a temporary sqlite store, logged the way the stages log them."""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest
from matplotlib import image as plt_image

from raysad import report as rp

METHODS = {"sad": 0.30, "token_kd": 0.20, "sft": 0.10}       # base success per method
SIZES = {"tiny-1m": 1.1e6, "tiny-5m": 5.3e6}
LAMBDAS = [(1.0, 1.0), (1.0, 2.0), (0.5, 1.0)]


def _success(method: str, size: str, lam: tuple[float, float] | None, seed: int) -> float:
    value = METHODS[method] + (0.2 if size == "tiny-5m" else 0.0) + 0.01 * seed * (1 if seed % 2 else -1)
    if lam is not None:
        value += 0.05 * lam[1] - 0.02 * lam[0]
    return round(value, 4)


def _evals() -> list[dict]:
    """The evaluated runs: every method x size x seed, sad also over the lambda grid."""
    out = []
    for method in METHODS:
        for size, params in SIZES.items():
            for seed in (0, 1, 2):
                for lam in (LAMBDAS if method == "sad" else [None]):
                    p = {"method": method, "student_size": size, "seed": str(seed), "env": "webshop",
                         "prune_ratio": "0.0"}
                    if lam:
                        p |= {"lambda_reason": str(lam[0]), "lambda_act": str(lam[1])}
                    m = {"eval/success_rate": _success(method, size, lam, seed), "eval/params": params,
                         "eval/latency_per_step_s": round(0.01 * (len(out) + 1), 4),
                         "eval/reasoning_tokens": 20.0 + len(out)}
                    if not (method == "sft" and seed == 2):  # one metric missing on some runs
                        m["eval/score"] = round(m["eval/success_rate"] * 0.9, 4)
                    out.append({"params": p, "metrics": m, "sweep": "a" if method != "sft" else "b"})
    return out


def _log(client, exp_id: str, name: str, params: dict, metrics: dict, tags: dict | None = None,
         history: dict[str, list[float]] | None = None, parent: str | None = None) -> str:
    from mlflow.entities import Metric, Param, RunTag

    tags = dict(tags or {})
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=name, tags=tags)
    now = int(time.time() * 1000)
    ms = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for key, values in (history or {}).items():
        ms += [Metric(key, v, now + i, i) for i, v in enumerate(values)]
    client.log_batch(run.info.run_id, metrics=ms, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with experiment `paper` (evaluated runs, a rollout run, distill runs with loss curves,
    a tune trial whose evaluate child logs only metrics), `bare` (no runs) and `unevaluated`."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("paper", artifact_location=str(root / "artifacts"))
    evals = _evals()
    for i, e in enumerate(evals):
        _log(client, exp, f"eval-{i}", e["params"], e["metrics"], {"stage": "evaluate", "sweep": e["sweep"]})
    _log(client, exp, "rollout", {"env": "webshop"}, {"rollout/episodes": 10.0}, {"stage": "rollout"})
    for k, method in enumerate(("sad", "token_kd")):
        hist = {"distill/reason_loss": [2.0, 1.5 + k, 1.2 + k, 1.0 + k], "distill/act_loss": [3.0, 2.0, 1.4, 1.1 - k]}
        _log(client, exp, f"distill-{method}", {"method": method}, {}, {"stage": "distill"}, history=hist)
    trial = _log(client, exp, "trial-0", {"method": "sad", "student_size": "tiny-20m", "lambda_reason": "2.0",
                                          "lambda_act": "0.5", "seed": "0", "prune_ratio": "0.5"}, {},
                 {"sweep": "c"})
    # a flattened config has a `run_name` param too: the run's own name must win
    child = _log(client, exp, "trial-0-eval", {"run_name": "None"}, {"eval/success_rate": 0.9, "eval/params": 1.0e7},
                 {"stage": "evaluate", "sweep": "c"}, parent=trial)
    client.create_experiment("bare", artifact_location=str(root / "bare"))
    other = client.create_experiment("unevaluated", artifact_location=str(root / "unevaluated"))
    _log(client, other, "rollout", {"env": "webshop"}, {"rollout/episodes": 3.0}, {"stage": "rollout"})
    return {"uri": uri, "root": root, "evals": evals, "trial_eval": child, "client": client}


def _config(store, **kw) -> rp.ReportConfig:
    return rp.ReportConfig(experiment=kw.pop("experiment", "paper"), tracking_uri=store["uri"],
                           log=kw.pop("log", False), **kw)


def test_grouped_means_std_and_order(store):
    result = rp.run_report(_config(store, group_by=["method", "student_size"], filter="tags.sweep != 'c'"))
    table = result.table
    expected = {}
    for e in store["evals"]:
        key = (e["params"]["method"], e["params"]["student_size"])
        expected.setdefault(key, []).append(e["metrics"])
    assert len(table) == len(expected) == 6
    for _, row in table.iterrows():
        runs = expected[(row["method"], row["student_size"])]
        success = [m["eval/success_rate"] for m in runs]
        assert row["n"] == len(runs)
        assert row["eval/success_rate"] == pytest.approx(statistics.mean(success))
        assert row["eval/success_rate_std"] == pytest.approx(statistics.stdev(success))
        scores = [m["eval/score"] for m in runs if "eval/score" in m]  # missing values are left out
        assert row["eval/score"] == pytest.approx(statistics.mean(scores))
    means = list(table["eval/success_rate"])
    assert means == sorted(means, reverse=True)
    assert (table.iloc[0]["method"], table.iloc[0]["student_size"]) == ("sad", "tiny-5m")


def test_per_run_table_sort_missing_cells_and_files(store, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=250)
    cfg = _config(store, sort_by="eval/latency_per_step_s", ascending=True, out=str(tmp_path / "t.csv"))
    result = rp.run_report(cfg, console=console)
    table = result.table
    assert len(table) == len(store["evals"]) + 1  # + the tune trial's evaluate run
    latency = table["eval/latency_per_step_s"]
    assert list(latency.dropna()) == sorted(latency.dropna()) and latency.isna().sum() == 1
    assert table.iloc[-1]["run_name"] == "trial-0-eval"  # no latency logged: sorted last
    assert "rollout" not in set(table["run_name"]) and "distill-sad" not in set(table["run_name"])

    printed = console.export_text()
    lines = [[c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]
             for line in printed.splitlines() if "│" in line or "┃" in line]
    header, cells = lines[0], {row[0]: dict(zip(lines[0], row)) for row in lines[1:]}
    assert header[:4] == ["run", "method", "student", "λ_r"]
    no_score = [f"eval-{i}" for i, e in enumerate(store["evals"]) if "eval/score" not in e["metrics"]]
    assert no_score and all(cells[name]["score"] == "-" for name in no_score)  # a dash, not 'nan'
    assert cells["eval-18"]["λ_r"] == "-" and cells["eval-0"]["λ_r"] == "1"
    assert cells["eval-9"]["params"] == "5.3M"
    assert "nan" not in printed.lower()

    import csv

    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == list(table["run_id"])
    assert float(rows[0]["eval/latency_per_step_s"]) == latency.iloc[0]

    as_json = rp.run_report(_config(store, group_by=["method"], out=str(tmp_path / "t.json"))).out
    records = json.loads(as_json.read_text())
    assert {r["method"] for r in records} == set(METHODS)
    sad = next(r for r in records if r["method"] == "sad")
    sad_success = [e["metrics"]["eval/success_rate"] for e in store["evals"] if e["params"]["method"] == "sad"]
    sad_success.append(0.9)  # the tune trial's run
    assert sad["n"] == len(sad_success) and sad["eval/success_rate"] == pytest.approx(statistics.mean(sad_success))


def test_params_inherited_from_parent_run(store):
    runs = rp.load_runs("paper", "tags.sweep = 'c'", store["uri"])
    row = runs[runs["run_id"] == store["trial_eval"]].iloc[0]
    assert (row["method"], row["student_size"], row["lambda_reason"], row["prune_ratio"]) == (
        "sad", "tiny-20m", 2.0, 0.5)


def test_filter_selects_runs(store):
    result = rp.run_report(_config(store, filter="tags.sweep = 'b'"))
    assert set(result.table["method"]) == {"sft"} and len(result.table) == 6


def test_plots_are_pngs_and_logged_as_artifacts(store, tmp_path):
    from matplotlib.image import imread

    result = rp.run_report(_config(store, plots=str(tmp_path / "plots"), log=True))
    names = sorted(p.name for p in result.plots)
    assert names == ["lambda_heatmap.png", "pareto.png", "training_curves.png"]
    for path in result.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # something was drawn
    client = store["client"]
    logged = {Path(a.path).name for a in client.list_artifacts(result.report_run_id, "report")}
    assert logged == set(names) | {"table.csv"}
    assert client.get_run(result.report_run_id).data.tags["stage"] == "report"
    # the report run itself is not a row of the next report
    again = rp.load_runs("paper", uri=store["uri"])
    assert result.report_run_id not in set(again["run_id"])


def test_training_curve_history(store):
    from mlflow.entities import Metric

    client = store["client"]
    runs = rp.load_runs("paper", "tags.stage = 'distill'", store["uri"])
    sad = runs[runs["run_name"] == "distill-sad"].iloc[0]
    assert rp.metric_history(client, sad["run_id"], rp.CURVE_ACT) == [(0, 3.0), (1, 2.0), (2, 1.4), (3, 1.1)]
    exp = client.create_experiment("relogged", artifact_location=str(store["root"] / "relogged"))
    run_id = _log(client, exp, "distill", {}, {}, history={rp.CURVE_REASON: [5.0, 4.0]})
    client.log_batch(run_id, metrics=[Metric(rp.CURVE_REASON, 3.5, int(time.time() * 1000) + 999, 1)])
    assert rp.metric_history(client, run_id, rp.CURVE_REASON) == [(0, 5.0), (1, 3.5)]  # the later value


def test_pareto_front():
    points = [(1.0, 0.2), (2.0, 0.1), (2.0, 0.5), (5.0, 0.4), (8.0, 0.7), (9.0, 0.7)]
    assert rp.pareto_front(points) == [(1.0, 0.2), (2.0, 0.5), (8.0, 0.7)]


def test_lambda_heatmap_values(store, tmp_path):
    rows = rp.evaluated(rp.load_runs("paper", "tags.sweep = 'a'", store["uri"]))
    sad = rows[rows["method"] == "sad"]
    grid = sad.pivot_table(index="lambda_reason", columns="lambda_act", values="eval/success_rate")
    want = statistics.mean(e["metrics"]["eval/success_rate"] for e in store["evals"]
                           if e["params"].get("lambda_act") == "2.0")
    assert grid.loc[1.0, 2.0] == pytest.approx(want)
    assert math.isnan(grid.loc[0.5, 2.0])  # never run: a hole in the grid, not a zero
    assert rp.plot_lambda_heatmap(sad, tmp_path / "h.png").is_file()
    # with CoT match measured, a second panel ranks the λs even where no student succeeds
    with_cot = sad.assign(**{rp.M_COT_MATCH: 0.3})
    one = plt_image.imread(rp.plot_lambda_heatmap(sad, tmp_path / "one.png"))
    two = plt_image.imread(rp.plot_lambda_heatmap(with_cot, tmp_path / "two.png"))
    assert two.shape[1] > 1.8 * one.shape[1] and two.shape[0] == one.shape[0]


def test_empty_and_unknown_inputs(store, tmp_path):
    bare = rp.run_report(_config(store, experiment="bare", plots=str(tmp_path / "p"), log=True))
    assert bare.table.empty and "no runs" in bare.message and bare.plots == [] and bare.report_run_id is None
    unevaluated = rp.run_report(_config(store, experiment="unevaluated", group_by=["method"]))
    assert unevaluated.table.empty and "none with eval/ metrics" in unevaluated.message
    with pytest.raises(rp.ReportError, match="no MLflow experiment named 'nope'.*paper"):
        rp.run_report(_config(store, experiment="nope"))
    with pytest.raises(rp.ReportError, match="unknown column 'size'.*student_size"):
        rp.run_report(_config(store, group_by=["size"]))
    with pytest.raises(rp.ReportError, match=r"\.csv or \.json"):
        rp.run_report(_config(store, out=str(tmp_path / "t.txt")))


def test_cli(store, tmp_path):
    from typer.testing import CliRunner

    from raysad.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["report", "--experiment", "paper", "--group-by", "method,student_size",
                                 "--tracking-uri", store["uri"], "--no-log", "--out", str(tmp_path / "g.csv")])
    assert result.exit_code == 0, result.output
    assert "token_kd" in result.output and "±" in result.output and (tmp_path / "g.csv").is_file()
    bad = runner.invoke(app, ["report", "--experiment", "nope", "--tracking-uri", store["uri"]])
    assert bad.exit_code == 2 and "no MLflow experiment" in bad.output
