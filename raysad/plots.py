"""Plot files in one place: matplotlib without a display, a figure saved as a PNG (`raysad report`, tune trials)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, layout: bool = True) -> Path:
    """Write `fig` to `path` (its folder made), close it, return the path. `layout`: tight_layout first (False
    when the caller laid the figure out itself, e.g. leaving room for a figure legend)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
