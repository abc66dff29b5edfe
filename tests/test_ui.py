"""raysad.ui: output that stays readable when stdout is not a terminal (pytest's capture is not one)."""
from __future__ import annotations

from raysad import ui


def test_a_long_line_is_not_wrapped_in_a_log(capsys):
    path = "/very/long/" + "x" * 150 + "/trials"
    ui.console().print(f"tune resuming the sweep in {path}")
    assert capsys.readouterr().out == f"tune resuming the sweep in {path}\n"


def test_progress_prints_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(ui, "LOG_EVERY_S", 0.0)
    with ui.Progress("rollout", 3, fields=("success",)) as bar:
        for done in range(3):
            bar.update(1, success=f"success {done}/3")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rollout 1/3  success 0/3  0:0")
    assert lines[-1].startswith("rollout 3/3  success 2/3") and len(lines) == 4  # 3 updates + the final line


def test_disabled_progress_prints_nothing(capsys):
    with ui.Progress("rollout", 2, enabled=False) as bar:
        bar.update(2)
    assert capsys.readouterr().out == ""
