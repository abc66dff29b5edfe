"""`benchmarks/replicate.py --small`: the whole replication (teacher, main sweep, λ sweep, pruning sweep, tables,
plots, MLflow) runs for real at a toy size."""
import importlib.util
import json
import sys
from pathlib import Path

import mlflow
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "replicate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_main_sweep_of_two_arms_writes_paired_tables_and_mlflow_and_a_report_rewrites_them(tmp_path, monkeypatch):
    """The default suite's version: the teacher and a main sweep of two arms (the whole --small, every stage,
    is the slow test below: 14 Tune trials, 14 min on 2 cores)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    replicate = load_script()
    out = tmp_path / "rep"
    results_md = replicate.main(["--small", "--methods", "sad,sft", "--stages", "main", "--out", str(out),
                                 "--tracking-uri", uri])
    assert results_md == out / "results.md"
    text = results_md.read_text()
    for heading in ("## hotpotqa", "### Students", "### Paired differences", "pooled success [95% CI]",
                    "CE on teacher's tokens"):
        assert heading in text
    [env] = json.loads((out / "results.json").read_text())["envs"]
    assert all(row["eval/reference_ce"] > 0 for row in env["main"])  # each trial scored on the teacher's tokens
    assert not {"lambda", "prune", "online", "onpolicy"} & set(env) and text.count("not run") == 4  # not asked
    assert sorted(row["method"] for row in env["main"]) == ["sad", "sft"]
    assert all(row["eval/params"] < env["teacher"]["eval/params"] for row in env["main"])  # cut from the teacher
    [paired] = env["paired"]  # the one comparison whose two arms ran, over the same test tasks
    assert (paired["a"], paired["b"]) == ("sad", "sft") and paired["line"] in text
    assert paired["tasks"] == replicate.SMALL["test_episodes"] == paired["pairs"]
    assert paired["low"] <= paired["mean"] <= paired["high"] and 0 <= paired["p_value"] <= 1
    assert (out / "plots" / "students.png").stat().st_size > 0

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["replicate-small-hotpotqa"], output_format="list")
    trials = {r.data.params["method"]: r for r in runs if r.data.tags.get("stage") == "trial"}
    assert set(trials) == {"sad", "sft"} and all(r.info.status == "FINISHED" for r in trials.values())
    row = next(row for row in env["main"] if row["method"] == "sad")
    assert trials["sad"].data.metrics["eval/success_rate"] == pytest.approx(row["eval/success_rate"])

    # `--stages report` runs nothing and writes the same tables back from MLflow and the run's files
    replicate.main(["--stages", "report", "--out", str(out), "--tracking-uri", uri, "--experiment",
                    "replicate-small"])
    [again] = json.loads((out / "results.json").read_text())["envs"]
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in env.items() if k != "wall_s"}
    assert len(mlflow.search_runs(experiment_names=["replicate-small-hotpotqa"], output_format="list")) == len(runs)


@pytest.mark.slow  # every stage of --small (the test above is the default suite's version)
@pytest.mark.timeout(1800)
def test_small_replication_runs_every_sweep_and_writes_tables_plots_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    replicate = load_script()
    results_md = replicate.main(["--small", "--out", str(tmp_path / "rep"), "--tracking-uri", uri])
    out = tmp_path / "rep"
    assert results_md == out / "results.md"
    text = results_md.read_text()
    for heading in ("## hotpotqa", "### Students", "### Paired differences", "### λ sweep", "### Pruning sweep",
                    "pooled success [95% CI]", "### On-policy against off-policy", "tokens trained per arm"):
        assert heading in text

    [env] = json.loads((out / "results.json").read_text())["envs"]
    main = env["main"]
    assert sorted(row["method"] for row in main) == ["flat_kd", "sad", "sad+curriculum", "sft", "token_kd"]
    assert all(row["n"] == 1 and 0.0 <= row["eval/success_rate"] <= 1.0 for row in main)
    teacher_params = env["teacher"]["eval/params"]
    assert all(row["eval/params"] < teacher_params for row in main)  # students cut from the teacher
    # paired differences, task by task: every comparison whose two arms ran, over the same test tasks
    paired = {(row["a"], row["b"]): row for row in env["paired"]}
    assert set(paired) == {tuple(c) for c in replicate.COMPARISONS}
    for row in paired.values():
        assert row["tasks"] == replicate.SMALL["test_episodes"] == row["pairs"]
        assert row["low"] <= row["mean"] <= row["high"] and 0 <= row["p_value"] <= 1
        assert row["line"] in text
    # λ sweep: the main sweep's (1, 1) SAD row next to the pair asked for (0, 1)
    assert sorted((row["lambda_reason"], row["lambda_act"]) for row in env["lambda"]) == [(0.0, 1.0), (1.0, 1.0)]
    # pruning sweep: ratio 0 is the unpruned best student; ratio 0.5 has fewer parameters
    prune = {row["prune_ratio"]: row for row in env["prune"]}
    assert set(prune) == {0.0, 0.5}
    assert prune[0.5]["eval/params"] < prune[0.0]["eval/params"]
    # the on-policy stage: every arm from the main sweep's SAD student, paired against each other
    assert sorted(row["method"] for row in env["onpolicy"]) == sorted(replicate.ONPOLICY_ARMS)
    start = Path(env["onpolicy_from"])  # the seed-0 SAD trial's student of the main sweep
    assert start.name == "student" and start.parents[1].name == "trials" and start.parents[2].name.endswith("-main")
    assert {(row["a"], row["b"]) for row in env["onpolicy_paired"]} == set(replicate.ONPOLICY_COMPARISONS)
    assert all((out / "plots" / name).stat().st_size > 0
               for name in ("students.png", "pruning.png", "lambda_hotpotqa.png"))

    # the same numbers in MLflow: one finished trial run per student, under its sweep's run
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["replicate-small-hotpotqa"], output_format="list")
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert len(trials) == 5 + 1 + 1 + len(replicate.ONPOLICY_ARMS)
    onpolicy = {r.data.params["method"]: r for r in trials if r.data.tags["sweep"].endswith("-onpolicy")}
    assert onpolicy["sad+onpolicy-sad-b2f"].data.params["onpolicy.depth_curriculum"] == "b2f"
    assert onpolicy["sad+onpolicy-sad"].data.params["onpolicy.teacher_topk"] == "4"
    assert onpolicy["sad"].data.params["distill.max_steps"] == "1"  # iterations x steps: as much training again
    assert all(r.info.status == "FINISHED" and "eval/success_rate" in r.data.metrics for r in trials)
    curriculum = next(r for r in trials if r.data.params["method"] == "sad+curriculum")
    assert curriculum.data.params["distill.curriculum"] == "True"
    flat = next(r for r in trials if r.data.params["method"] == "flat_kd")
    # stored, as the other arms (no teacher param: None is not logged): the teacher's rollout kept its top-k at
    # observation tokens too (--context-topk), so flat KD trains on more tokens than token KD from the same file
    assert "distill.teacher" not in flat.data.params
    token_kd = next(r for r in trials
                    if r.data.params["method"] == "token_kd" and r.data.tags["sweep"] == flat.data.tags["sweep"])
    assert flat.data.metrics["distill/act_tokens"] > token_kd.data.metrics["distill/act_tokens"]
    by_sweep = {}
    for r in trials:
        by_sweep.setdefault(r.data.tags["sweep"], []).append(r)
    assert set(by_sweep) == {f"replicate-small-hotpotqa-{k}" for k in ("main", "lambda", "prune", "onpolicy")}
    sad = next(r for r in by_sweep["replicate-small-hotpotqa-main"] if r.data.params["method"] == "sad")
    row = next(row for row in main if row["method"] == "sad")
    assert sad.data.metrics["eval/success_rate"] == pytest.approx(row["eval/success_rate"])

    # `--stages report` runs nothing and writes the same tables back from MLflow and the run's files
    before = json.loads((out / "results.json").read_text())["envs"]
    replicate.main(["--stages", "report", "--out", str(out), "--tracking-uri", uri, "--experiment",
                    "replicate-small"])
    [again] = json.loads((out / "results.json").read_text())["envs"]
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in before[0].items() if k != "wall_s"}
    assert again["settings"]["teacher_steps"] == replicate.SMALL["teacher_steps"]  # the run's, not the flags'
    assert len(mlflow.search_runs(experiment_names=["replicate-small-hotpotqa"], output_format="list")) == len(runs)


def test_bad_flags_exit_2_naming_the_field(capsys):
    replicate = load_script()
    for argv, words in ((["--stages", "report,main"], "report runs alone"), (["--seeds", "three"], "seeds"),
                        (["--stages", "mian"], "unknown ['mian']")):
        with pytest.raises(SystemExit) as exit_:
            replicate.main(argv)
        assert exit_.value.code == 2 and words in capsys.readouterr().err
