"""`raysad report`: compare the runs of one MLflow experiment in a table and plots.

A row is a run that logged `eval/*` metrics (an evaluated student). Its description (method, student size,
lambdas, pruning ratio, seed ...) comes from the run's params, or from its ancestors' for a param it lacks (a
tune trial holds the trial's config, the evaluate run nested under it holds the metrics). Rows are sorted,
optionally grouped (mean ± sample std over what the group leaves out, usually seeds), printed with rich and
written to CSV/JSON. Plots: success vs parameters per method with each method's Pareto front, success over
the (λ_r, λ_a) grid, and the reason/act training losses per distillation run. The table and the plots are
logged as artifacts of a `report` run in the same experiment (tag stage=report; later reports skip it).

The names below are the contract between the stages and this report; docs/metrics.md describes them.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysad.configs import ReportConfig
from raysad.plots import pyplot, save

# --- the contract: params and metrics the stages log, the report reads --------------------------------------
P_METHOD = "method"                  # sad | sad+curriculum | token_kd | flat_kd | sft | teacher (method_label)
P_STUDENT_SIZE = "student_size"      # a size name (tiny-5m, 0.5B ...) for grouping; exact count is eval/params
P_LAMBDA_REASON = "lambda_reason"
P_LAMBDA_ACT = "lambda_act"
P_PRUNE_RATIO = "prune_ratio"        # 0 = not pruned
P_DIVERGENCE = "divergence"          # forward_kl | reverse_kl | jsd
P_SEED = "seed"
P_ENV = "env"
PARAMS = (P_METHOD, P_STUDENT_SIZE, P_LAMBDA_REASON, P_LAMBDA_ACT, P_PRUNE_RATIO, P_DIVERGENCE, P_SEED, P_ENV)
NUMERIC_PARAMS = (P_LAMBDA_REASON, P_LAMBDA_ACT, P_PRUNE_RATIO, P_SEED)

M_SUCCESS = "eval/success_rate"
M_MEAN_REWARD = "eval/mean_reward"
M_SCORE = "eval/score"
M_EM = "eval/em"
M_F1 = "eval/f1"
M_REASONING_TOKENS = "eval/reasoning_tokens"       # mean generated thought tokens per episode
M_LATENCY = "eval/latency_per_step_s"
M_TOKENS_PER_S = "eval/tokens_per_s"
M_PARAMS = "eval/params"                           # parameter count of the evaluated model
M_COT_MATCH = "eval/cot_match_rate"
M_REFERENCE_CE = "eval/reference_ce"               # nats per thought/action token of the reference (teacher-forced)
M_INVALID_ACTIONS = "eval/invalid_action_rate"
M_STEPS = "eval/steps"                             # mean steps per episode
EVAL_METRICS = (M_SUCCESS, M_MEAN_REWARD, M_SCORE, M_EM, M_F1, M_REASONING_TOKENS, M_LATENCY, M_TOKENS_PER_S,
                M_PARAMS, M_COT_MATCH, M_REFERENCE_CE, M_INVALID_ACTIONS, M_STEPS)
CURVE_REASON = "distill/reason_loss"               # logged per optimizer step
CURVE_ACT = "distill/act_loss"
STUDENT_LABELS = "raysad.json"                     # in a student's folder: its P_* params (student_labels)
STAGE_TAG = "stage"                                # every stage tags its run; the report's own runs say "report"

# what the printed table shows (the CSV/JSON hold every eval/* metric); optional ones only when present
_HEADERS = {"run_name": "run", P_METHOD: "method", P_STUDENT_SIZE: "student", P_LAMBDA_REASON: "λ_r",
            P_LAMBDA_ACT: "λ_a", P_PRUNE_RATIO: "prune", P_SEED: "seed", "n": "n", M_SUCCESS: "success",
            M_SCORE: "score", M_EM: "EM", M_F1: "F1", M_REASONING_TOKENS: "reason tok",
            M_LATENCY: "s/step", M_PARAMS: "params", M_COT_MATCH: "CoT match", M_REFERENCE_CE: "ref CE"}
_SHOWN_METRICS = (M_SUCCESS, M_SCORE, M_EM, M_F1, M_COT_MATCH, M_REFERENCE_CE, M_REASONING_TOKENS, M_LATENCY,
                  M_PARAMS)
_OPTIONAL_METRICS = (M_EM, M_F1, M_COT_MATCH, M_REFERENCE_CE)
MAX_CURVES = 30  # training-curve runs drawn (legend stays readable)
PARETO_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def method_label(method: str, curriculum: bool = False, onpolicy: str | None = None) -> str:
    """The `method` param of a distilled student: the distill method, '+curriculum' when its data was ordered
    easy -> hard (the paper's SAD is sad+curriculum), '+onpolicy-<method>' when it then trained on-policy, so
    the report tells them apart."""
    label = f"{method}+curriculum" if curriculum else method
    return f"{label}+onpolicy-{onpolicy}" if onpolicy else label


def onpolicy_label(config) -> str:
    """An on-policy stage in a method label: its method, then its depth curriculum and take-over if on
    ('sad-b2f', 'token_kd-takeover')."""
    return "-".join([config.method] + ([config.depth_curriculum] if config.depth_curriculum != "off" else [])
                    + (["takeover"] if config.teacher_takeover else []))


def student_labels(config, onpolicy=None) -> dict[str, Any]:
    """The report's params of a student distilled with `config` (a DistillConfig) and then, if given, trained
    on-policy with `onpolicy` (an OnPolicyConfig): what distill writes to <out>/raysad.json, so a hand-run
    evaluate -> report shows its method, λs and seed."""
    return {P_METHOD: method_label(config.method, config.curriculum, onpolicy_label(onpolicy) if onpolicy else None),
            P_LAMBDA_REASON: config.lambda_reason,
            P_LAMBDA_ACT: config.lambda_act, P_DIVERGENCE: config.divergence, P_SEED: config.seed}


class ReportError(ValueError):
    """Bad report input (unknown experiment, column or output format); the message says what is known."""


@dataclass
class Report:
    runs: Any                      # pandas DataFrame: every run found (but report runs), contract params resolved
    table: Any                     # pandas DataFrame: the rows shown, sorted (grouped: means, *_std, n)
    plots: list[Path] = field(default_factory=list)
    out: Path | None = None
    report_run_id: str | None = None
    message: str | None = None     # why the table is empty, when it is


# --- reading runs -------------------------------------------------------------------------------------------

def load_runs(experiment: str, filter: str | None = None, uri: str | None = None):
    """The runs of `experiment` (matching `filter`) as a DataFrame: run_id, run_name, parent_id, stage, every
    param and latest metric by name; a contract param a run lacks is taken from its nearest ancestor."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from raysad.tracking import tracking_uri

    client = MlflowClient(tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment named {experiment!r} at {tracking_uri(uri)}; "
                          f"experiments there: {', '.join(known) or 'none'}")
    records, metric_names, token = [], set(EVAL_METRICS), None
    while True:
        page = client.search_runs([exp.experiment_id], filter or "", max_results=1000, page_token=token)
        for run in page:
            metric_names |= set(run.data.metrics)
            # run info last: a config param named run_name (or stage) must not hide the run's own
            records.append({**run.data.params, **run.data.metrics, "run_id": run.info.run_id,
                            "run_name": run.info.run_name, "parent_id": run.data.tags.get("mlflow.parentRunId"),
                            STAGE_TAG: run.data.tags.get(STAGE_TAG)})
        token = page.token
        if not token:
            break
    _inherit_params(records, client)
    runs = pd.DataFrame.from_records(records, columns=_columns(records))
    runs = runs[runs[STAGE_TAG] != "report"].reset_index(drop=True)
    for name in [*NUMERIC_PARAMS, *(m for m in metric_names if m in runs.columns)]:
        runs[name] = pd.to_numeric(runs[name], errors="coerce")  # a metric nobody logged: NaN, not None
    return runs


def _columns(records: list[dict]) -> list[str]:
    names = ["run_id", "run_name", "parent_id", STAGE_TAG, *PARAMS, *EVAL_METRICS]
    seen = set(names)
    for rec in records:
        names += [k for k in rec if k not in seen and not seen.add(k)]
    return names


def _inherit_params(records: list[dict], client) -> None:
    by_id = {r["run_id"]: r for r in records}
    fetched: dict[str, dict] = {}  # ancestors outside the filter are read once

    def run_params(run_id: str) -> tuple[dict, str | None]:
        if run_id in by_id:
            return by_id[run_id], by_id[run_id]["parent_id"]
        if run_id not in fetched:
            run = client.get_run(run_id)
            fetched[run_id] = {**run.data.params, "parent_id": run.data.tags.get("mlflow.parentRunId")}
        return fetched[run_id], fetched[run_id]["parent_id"]

    for rec in records:
        parent, depth = rec["parent_id"], 0
        while parent and depth < 10 and any(rec.get(p) is None for p in PARAMS):
            values, parent = run_params(parent)
            for name in PARAMS:
                if rec.get(name) is None and values.get(name) is not None:
                    rec[name] = values[name]
            depth += 1


def episode_outcomes(rows, uri: str | None = None, field: str = "success") -> dict[tuple[int, str], float]:
    """Per (seed, task_id): the episode's success (or score) in the runs `rows`, read from each run's eval.json
    artifact (evaluate writes every episode's outcome there); for raysad.stats.paired_difference."""
    from mlflow.tracking import MlflowClient

    from raysad.tracking import tracking_uri

    client = MlflowClient(tracking_uri(uri))
    outcomes: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in rows.iterrows():
            path = client.download_artifacts(row["run_id"], "eval.json", tmp)
            episodes = json.loads(Path(path).read_text()).get("episodes")
            if episodes is None:
                raise ReportError(f"run {row['run_id']} ({row['run_name']}): its eval.json lists no episodes "
                                  "(written before raysad recorded per-task outcomes); evaluate it again")
            seed = int(row[P_SEED]) if row.get(P_SEED) == row.get(P_SEED) and row.get(P_SEED) is not None else 0
            for ep in episodes:
                outcomes[(seed, str(ep["task_id"]))] = float(ep[field])
    return outcomes


# --- the table ----------------------------------------------------------------------------------------------

def evaluated(runs):
    """The runs that logged at least one eval/* metric."""
    metrics = [c for c in runs.columns if c.startswith("eval/")]
    return runs[runs[metrics].notna().any(axis=1)] if metrics else runs.iloc[0:0]


def summarize(rows, group_by: list[str] | tuple = (), sort_by: str = M_SUCCESS, ascending: bool = False):
    """Per-run table, or with `group_by` one row per group: `n`, each eval metric's mean and `<metric>_std`
    (sample std, ddof=1; empty for a group of one). Sorted by `sort_by` (missing values last)."""
    import pandas as pd

    metrics = [c for c in rows.columns if c.startswith("eval/")]
    known = [c for c in rows.columns if c not in ("parent_id",)]
    for name in list(group_by) + [sort_by]:
        if name not in rows.columns:
            raise ReportError(f"unknown column {name!r}; known: {', '.join(known)}")
    if group_by:
        grouped = rows.groupby(list(group_by), dropna=False, sort=False)
        table = grouped[metrics].mean()
        std = grouped[metrics].std(ddof=1).add_suffix("_std")
        table = pd.concat([grouped.size().rename("n"), table, std], axis=1).reset_index()
        if sort_by not in table.columns:
            raise ReportError(f"--sort-by {sort_by!r}: grouped rows have {', '.join(table.columns)}")
    else:
        table = rows[["run_id", "run_name", *PARAMS, *metrics]].copy()
    return table.sort_values(sort_by, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def shown_columns(table, grouped: bool) -> list[str]:
    """The columns the printed table shows, in order."""
    if grouped:
        keys = [c for c in table.columns if c != "n" and not c.startswith("eval/")]
        head = keys + ["n"]
    else:
        head = ["run_name", P_METHOD, P_STUDENT_SIZE, P_LAMBDA_REASON, P_LAMBDA_ACT, P_PRUNE_RATIO, P_SEED]
    metrics = [m for m in _SHOWN_METRICS if m in table.columns
               and (m not in _OPTIONAL_METRICS or table[m].notna().any())]
    return head + metrics


def cell(value: Any, std: Any = None, column: str = "") -> str:
    """One table cell: '-' for a missing value, parameter counts as 1.2M, `mean ± std` for groups."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    if column == M_PARAMS:  # the same model across seeds: its spread says nothing
        return _count(value)
    if std is None or isinstance(std, float) and math.isnan(std):
        return _number(value)
    return f"{_number(value, exact=False)} ± {_number(std, like=value)}"


def _number(x: float, like: float | None = None, exact: bool = True) -> str:
    """Whole numbers as such (seeds, lambdas, counts); else 3 decimals below 10, 1 below 1000, then 4 digits.
    `like`: format with the precision `like` would get (a std next to its mean)."""
    ref = abs(x if like is None else like)
    if exact and like is None and float(x).is_integer() and ref < 1e6:
        return str(int(x))
    return f"{x:.3f}" if ref < 10 else f"{x:.1f}" if ref < 1000 else f"{x:.4g}"


def _count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def render(table, grouped: bool, title: str = ""):
    """The table as a rich Table."""
    from rich.table import Table

    columns = shown_columns(table, grouped)
    out = Table(title=title, show_lines=False)
    for col in columns:
        out.add_column(_HEADERS.get(col, col), justify="left" if col in ("run_name", P_METHOD, P_STUDENT_SIZE)
                       else "right")
    for _, row in table.iterrows():
        out.add_row(*[cell(row[c], row.get(f"{c}_std") if grouped else None, c) for c in columns])
    return out


def write_table(table, path: str | Path) -> Path:
    """The table (every column, numbers unformatted) as .csv or .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".json":
        records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
                   for rec in table.to_dict(orient="records")]
        path.write_text(json.dumps(records, indent=1, default=str) + "\n")
    else:
        raise ReportError(f"--out {path}: expected a .csv or .json file name")
    return path


# --- plots --------------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or as many) parameters and a higher (or equal) success,
    by increasing parameter count. `points` are (params, success)."""
    front: list[tuple[float, float]] = []
    for params, success in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or success > front[-1][1]:
            front.append((params, success))
    return front


def plot_pareto(rows, path: str | Path) -> Path | None:
    """Success vs parameters, one colour per method: mean over seeds per (method, size) and its Pareto front."""
    data = rows.dropna(subset=[M_PARAMS, M_SUCCESS])
    if data.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    data = data.assign(**{P_METHOD: data[P_METHOD].fillna("?")})
    groups = list(data.groupby(P_METHOD))
    for i, (method, runs) in enumerate(groups):
        means = runs.groupby(M_PARAMS)[M_SUCCESS].mean()
        points = [(float(p), float(s)) for p, s in means.items()]
        # methods often tie (all at 0 success): each its own marker, the first drawn largest, so a tie shows as
        # nested shapes rather than one dot
        dots = ax.scatter(*zip(*points), s=36 + 40 * (len(groups) - 1 - i), label=method, zorder=3 + i,
                          marker=PARETO_MARKERS[i % len(PARETO_MARKERS)], clip_on=False)
        color = dots.get_facecolor()[0]
        ax.scatter(runs[M_PARAMS], runs[M_SUCCESS], s=10, color=color, alpha=0.3, zorder=2)  # single runs
        ax.plot(*zip(*pareto_front(points)), color=color, linewidth=1.5, zorder=2)
    xs = data[M_PARAMS]
    if xs.min() > 0 and xs.max() / xs.min() > 10:
        ax.set_xscale("log")
    ax.set_ylim(bottom=0)  # a rate: the axis never goes below 0; moved down a little so dots at 0 show whole
    ax.spines["bottom"].set_position(("outward", 10))
    ax.set_xlabel("parameters")
    ax.set_ylabel("success rate")
    ax.set_title("Success vs parameters: mean over seeds (faint: runs), line: Pareto front")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_lambda_heatmap(rows, path: str | Path) -> Path | None:
    """Mean success and, where measured, mean CoT match over the (λ_r, λ_a) grid, one panel each, for the SAD
    runs (or every run with both lambdas). CoT match still ranks the λs when no student succeeds."""
    data = rows.dropna(subset=[P_LAMBDA_REASON, P_LAMBDA_ACT, M_SUCCESS])
    if (data[P_METHOD] == "sad").any():
        data = data[data[P_METHOD] == "sad"]
    if data.empty:
        return None
    titles = {M_SUCCESS: "Success rate", M_COT_MATCH: "CoT match rate"}
    metrics = [m for m in titles if m in data.columns and data[m].notna().any()]
    grids = [data.pivot_table(index=P_LAMBDA_REASON, columns=P_LAMBDA_ACT, values=m, aggfunc="mean")
             for m in metrics]
    plt = pyplot()
    shape = grids[0].shape
    fig, axes = plt.subplots(1, len(grids), figsize=(len(grids) * (1.6 + 1.1 * shape[1]), 1.4 + 0.8 * shape[0]),
                             squeeze=False)
    for ax, metric, grid in zip(axes[0], metrics, grids):
        image = ax.imshow(grid.to_numpy(dtype=float), origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        low, high = image.get_clim()
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                value = float(grid.iat[i, j])
                bright = high > low and (value - low) / (high - low) > 0.6  # dark text on the yellow end
                ax.text(j, i, cell(value), ha="center", va="center", color="black" if bright else "white")
        ax.set_xlabel("λ_act")
        ax.set_ylabel("λ_reason")
        ax.set_title(f"{titles[metric]} by λ\n(mean over the other settings)", fontsize=9)  # fits a 1x1 grid too
        fig.colorbar(image, ax=ax)
    return save(fig, path)


def plot_training_curves(runs, path: str | Path, uri: str | None = None) -> Path | None:
    """distill/reason_loss and distill/act_loss per step, one line per distillation run (from metric history)."""
    from mlflow.tracking import MlflowClient

    from raysad.tracking import tracking_uri

    has = [c for c in (CURVE_REASON, CURVE_ACT) if c in runs.columns]
    data = runs[runs[has].notna().any(axis=1)].head(MAX_CURVES) if has else runs.iloc[0:0]
    if data.empty:
        return None
    client = MlflowClient(tracking_uri(uri))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for _, run in data.iterrows():
        label = " ".join(str(v) for v in (run["run_name"], run.get(P_METHOD)) if isinstance(v, str))
        for ax, key in zip(axes, (CURVE_REASON, CURVE_ACT)):
            history = metric_history(client, run["run_id"], key)
            if history:
                ax.plot(*zip(*history), label=label, linewidth=1.2)
    for ax, key in zip(axes, (CURVE_REASON, CURVE_ACT)):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].legend(fontsize=7)
    return save(fig, path)


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric by step; a step logged twice keeps its later value."""
    points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    return list({step: value for step, _, value in points}.items())


# --- the command --------------------------------------------------------------------------------------------

def run_report(config: ReportConfig, console=None) -> Report:
    """Load, summarise, print, write and plot as `config` says; log into a `report` run when config.log."""
    from raysad import ui

    console = console or ui.console()
    runs = load_runs(config.experiment, config.filter, config.tracking_uri)
    rows = evaluated(runs)
    grouped = bool(config.group_by)
    table = summarize(rows, config.group_by, config.sort_by, config.ascending)
    report = Report(runs=runs, table=table)
    where = f"experiment {config.experiment!r}" + (f" (filter: {config.filter})" if config.filter else "")
    if runs.empty:
        report.message = f"{where} has no runs yet: run a stage with --experiment {config.experiment} first"
    elif rows.empty:
        report.message = (f"{where}: {len(runs)} run(s), none with eval/ metrics; "
                          f"`raysad evaluate --experiment {config.experiment}` logs them")
    if report.message:
        console.print(f"[yellow]{report.message}[/yellow]")
    else:
        title = f"{where}: {len(rows)} evaluated run(s)" + (f", grouped by {', '.join(config.group_by)}"
                                                             if grouped else "")
        console.print(render(table, grouped, title))
    if config.out and not table.empty:
        report.out = write_table(table, config.out)
        console.print(f"table written to [bold]{report.out}[/bold]")
    if config.plots:
        plots_dir = Path(config.plots)
        made = [plot_pareto(rows, plots_dir / "pareto.png"),
                plot_lambda_heatmap(rows, plots_dir / "lambda_heatmap.png"),
                plot_training_curves(runs, plots_dir / "training_curves.png", config.tracking_uri)]
        report.plots = [p for p in made if p is not None]
        if report.plots:
            console.print("plots: " + ", ".join(f"[bold]{p}[/bold]" for p in report.plots))
    if config.log and (not table.empty or report.plots):
        report.report_run_id = _log_report(config, table, report.plots)
        console.print(f"logged as run [bold]{report.report_run_id}[/bold] (report) in {config.experiment!r}")
    return report


def _log_report(config: ReportConfig, table, plots: list[Path]) -> str:
    import mlflow

    from raysad import tracking

    params = {"group_by": ",".join(config.group_by), "sort_by": config.sort_by, "filter": config.filter or ""}
    with tracking.start_run(config.experiment, "report", params, tags={STAGE_TAG: "report"},
                            uri=config.tracking_uri) as run:
        with tempfile.TemporaryDirectory() as tmp:
            if not table.empty:
                mlflow.log_artifact(str(write_table(table, Path(tmp) / "table.csv")), "report")
        for path in plots:
            mlflow.log_artifact(str(path), "report")
        return run.info.run_id


def main(config_path: str | Path | None = None, **flags: Any) -> Report:
    """`raysad report`: build the config (defaults < YAML < flags) and run it."""
    from raysad.config import build_config

    return run_report(build_config(ReportConfig, config_path, **flags))
