"""What the comparative benchmarks share, so that each measures its sides the same way.

- `alternate(sides, repeats)`: the order of the runs. Every side runs once per repeat; the order flips each
  repeat (A B C, C B A, A B C ...), so neither a side's place in the sequence nor a busy minute of the machine
  picks the ratio. Warm-up belongs to each run (its first steps or calls are timed apart and left out).
- `run_child(...)`: one run in a fresh subprocess (its own peak memory, no state from the previous run), torch
  threads pinned through the environment; the child prints one `RESULT {json}` line (`child_result`).
- `Spread`: median and range of a side's repeats; ratios are of medians.
- `Machine`: what a reader needs to judge a figure: CPUs, threads, load average before/after, commit, versions.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULT_PREFIX = "RESULT "
REPO = Path(__file__).resolve().parents[1]


def alternate(sides: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, side) in run order: forward on even repeats, backward on odd ones."""
    order = []
    for repeat in range(repeats):
        order += [(repeat, side) for side in (sides if repeat % 2 == 0 else sides[::-1])]
    return order


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins a child's intra-op threads (torch reads OMP_NUM_THREADS at start)."""
    pinned = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {**os.environ, **pinned, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def pin_threads(threads: int) -> None:
    """In a child: torch's intra- and inter-op threads to `threads` (also when the variable was ignored)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def child_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(command: list[str], threads: int, label: str, timeout: float | None = None,
              extra_env: dict[str, str] | None = None) -> dict:
    """Run a child benchmark process; its RESULT line as a dict (plus the load average around it)."""
    load_before = load_average()
    began = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                         env={**thread_env(threads), **(extra_env or {})}, cwd=REPO)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if run.returncode or not lines:
        sys.stderr.write(run.stdout[-3000:] + "\n" + run.stderr[-5000:] + "\n")
        raise SystemExit(f"{label}: the child failed (exit {run.returncode}); its output is above")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result.update(load_before=load_before, load_after=load_average(), wall_s=time.perf_counter() - began)
    return result


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass
class Spread:
    """Median and range of one side's repeats."""
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def show(self, digits: int = 0) -> str:
        if not self.values:
            return "-"
        form = f"{{:,.{digits}f}}"
        if len(self.values) == 1:
            return form.format(self.values[0])
        return f"{form.format(self.median)} [{form.format(min(self.values))}–{form.format(max(self.values))}]"


def ratio(a: Spread, b: Spread) -> str:
    return f"×{a.median / b.median:.2f}" if b.values and b.median else "-"


@dataclass
class Machine:
    threads: int
    loads: list[float] = field(default_factory=list)

    def record(self, result: dict) -> None:
        self.loads += [result["load_before"], result["load_after"]]

    def describe(self) -> str:
        import torch

        load = f"{min(self.loads):.2f}–{max(self.loads):.2f}" if self.loads else f"{load_average():.2f}"
        return (f"{time.strftime('%Y-%m-%d')}, commit {commit()}, {os.cpu_count()} CPUs "
                f"({platform.processor() or platform.machine()}), {self.threads} torch thread(s) per run, "
                f"load average {load} (1 min, around the runs), Python {platform.python_version()}, "
                f"torch {torch.__version__}")


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: str | None, text: str, data: dict) -> None:
    """The printed table as <path>.md and the raw figures as <path>.json (when asked for)."""
    if not path:
        return
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".md").write_text(text + "\n")
    base.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"written: {base.with_suffix('.md')}, {base.with_suffix('.json')}")
