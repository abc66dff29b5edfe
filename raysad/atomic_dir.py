"""Write a folder atomically: fill a hidden sibling folder, then rename it into place, so an interrupted write
(an exception, Ctrl-C, SIGKILL) never leaves a half-written folder where a finished one is expected."""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from raysad.locks import pid_alive


def write_atomically(out_dir: Path, write, replace: bool = False) -> Path:
    """Run write(tmp) on a fresh sibling folder of `out_dir`, then rename it to `out_dir`: an interrupted
    write leaves no half-written `out_dir` (only a hidden .partial folder, removed by the next attempt).
    `out_dir` must not exist or be empty, unless `replace`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(glob.escape(f".{out_dir.name}.partial-") + "*"):  # left by a killed run
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise FileExistsError(f"{out_dir}: exists and is not empty")
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if out_dir.exists():
            if any(out_dir.iterdir()):
                if not replace:  # written meanwhile by another process
                    raise FileExistsError(f"{out_dir}: exists and is not empty")
                old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                out_dir.rename(old)
            else:
                out_dir.rmdir()
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
