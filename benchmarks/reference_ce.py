"""The reference CE of every finished trial of a sweep: each student's cross-entropy (nats per token) on the
thought and action tokens of the teacher's test trajectories, the same number `raysad evaluate --reference`
now logs as eval/reference_ce. Trials evaluated before evaluate computed it get it here, from their final
student and the reference their evaluation used (trial.json), so every row of a sweep has it.

    python benchmarks/reference_ce.py runs/replicate-smollm2/hotpotqa/tune/replicate-smollm2-hotpotqa-main \
        --reference runs/replicate-smollm2/hotpotqa/teacher_test_reference.jsonl --episodes 300 --log

Prints one row per trial (method, seed, CE, whether the trial run already had it). With --log, a trial run that
lacks the metric gets it (MLflow, the trial's own run), tagged `reference_ce_added_later`; a run that has it is
left alone and its value is checked against this one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    import torch

    from raysad import report as names
    from raysad.evaluate import read_reference, reference_ce

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a sweep's folder (its trials/<id>/trial.json)")
    parser.add_argument("--reference", required=True, help="the teacher trajectories the trials' CoT match used")
    parser.add_argument("--episodes", type=int, required=True,
                        help="the trials' evaluation episodes (evaluate reads that many reference trajectories)")
    parser.add_argument("--env", default="hotpotqa")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--log", action="store_true", help="add the metric to trial runs that lack it")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    trials = sorted(Path(args.sweep).glob("trials/*/trial.json"))
    if not trials:
        raise SystemExit(f"{args.sweep}: no finished trial (trials/*/trial.json)")
    reference = read_reference(args.reference, args.env, args.episodes)
    client = None
    if args.log:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(args.tracking_uri)
    print(f"{len(reference)} reference trajectories from {args.reference}")
    print(f"{'trial':14s} {'method':16s} {'seed':>4s} {'reference CE':>12s}  in its run")
    for path in trials:
        trial = json.loads(path.read_text())
        ce = reference_ce(trial["model"], reference)
        run_file = path.parent / "mlflow_run_id"
        logged = None
        if client is not None and run_file.is_file():
            run_id = run_file.read_text().strip()
            logged = client.get_run(run_id).data.metrics.get(names.M_REFERENCE_CE)
            if logged is None:
                client.log_metric(run_id, names.M_REFERENCE_CE, ce)
                client.set_tag(run_id, "reference_ce_added_later", f"benchmarks/reference_ce.py, {args.reference}")
            elif abs(logged - ce) > 1e-3 * max(1.0, abs(ce)):
                raise SystemExit(f"{path.parent.name}: its run holds eval/reference_ce {logged:.4f}, this "
                                 f"computes {ce:.4f}: another reference or episodes?")
        student = trial.get("student", {})
        state = "-" if client is None else ("yes" if logged is not None else "added")
        print(f"{trial['trial_id']:14s} {student.get('method', '?'):16s} {student.get('seed', '?'):>4} "
              f"{ce:12.3f}  {state}", flush=True)


if __name__ == "__main__":
    main()
