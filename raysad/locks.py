"""One writer per output: a lock file next to what a stage writes, and a lock around MLflow's sqlite set-up.

`output_lock(path, what)` takes `path` (e.g. `<out>.lock`) with fcntl.flock on an open fd: atomic, released
by the kernel when the holder exits however it exits, and by the context manager (which also deletes the file)
on return, exception or Ctrl-C. The file names its holder (pid, host, start time, command) so that a second
writer fails at once with one line (LockHeld, a ValueError: the CLI exits 2) saying who holds it. A lock file
left by a killed holder is not locked any more and is taken over, with a log line.

`setup_lock(path)` waits for `path` (kept, e.g. `mlflow.db.lock`) so that processes starting together create a
sqlite tracking DB one after the other instead of racing on its tables.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_SECRET_FLAG = re.compile(r"^(--?(?:[\w-]*[_-])?(?:key|apikey|token|secret|password|authorization)(?:[_-][\w-]*)?)"
                          r"(=.*)?$", re.I)  # --api-key, --hf-token=..., not --tokenizer or --max-new-tokens


class LockHeld(ValueError):
    """Another process holds the lock of an output; its message is one line naming the lock file and holder."""


def lock_path(out: str | os.PathLike) -> Path:
    """`<out>.lock`: the lock of a file or folder output, next to it (not inside a model folder)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _command() -> str:
    """This process's command line, secrets (values of --api-key, --token, ...) replaced by ***."""
    words, hide = [], False
    for word in sys.argv:
        if hide:
            words.append("***")
            hide = False
            continue
        match = _SECRET_FLAG.match(word)
        if match and match.group(2):
            words.append(match.group(1) + "=***")
        else:
            words.append(word)
            hide = bool(match)
    if words:
        words[0] = Path(words[0]).name
    return shlex.join(words).replace("\n", " ")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def _holder(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def describe(info: dict[str, Any]) -> str:
    """'pid 12 on host h since 2026-01-01T00:00:00Z: raysad rollout ...' (what is known of a holder)."""
    if not info:
        return "an unknown process (the lock file names none)"
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    if info.get("started"):
        text += f" since {info['started']}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text.replace("\n", " ")


class OutputLock:
    """An exclusive, non-waiting lock on one output; use as a context manager (see the module doc)."""

    def __init__(self, path: str | os.PathLike, what: str = "output"):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # the file can be replaced between open and flock (a holder releasing): retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._lock(fd) and self._current(fd):
                    self._claim(fd)
                    self._fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise LockHeld(f"{self.path}: could not take the lock of {self.what} (the file kept changing); "
                       "another writer is starting on it")

    def _lock(self, fd: int) -> bool:
        """flock(fd); LockHeld when held. Where flock is unsupported, judge by the holder's pid."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self._refuse(_holder(self._read(fd)))
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
        info = _holder(self._read(fd))  # no flock here (some network filesystems): the pid decides
        pid = info.get("pid")
        if info and (info.get("host") != socket.gethostname() or
                     (isinstance(pid, int) and pid > 0 and pid != os.getpid() and pid_alive(pid))):
            self._refuse(info)
        return True

    def _refuse(self, info: dict[str, Any]) -> None:
        raise LockHeld(f"{self.path} is held by {describe(info)}: another writer is writing {self.what}; wait "
                       f"for it to finish or use another --out (delete the lock file only if that process is gone)")

    def _current(self, fd: int) -> bool:
        """Whether fd is still the file at self.path (not one a releasing holder just deleted)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 65536).decode("utf-8", "replace")

    def _claim(self, fd: int) -> None:
        old = self._read(fd)
        if old.strip():  # its holder ended without releasing it (killed): take it over
            info = _holder(old)
            pid = info.get("pid")
            gone = ("(pid dead)" if info.get("host") == socket.gethostname() and isinstance(pid, int)
                    and not pid_alive(pid) else "(no longer holds it)")
            log.warning("%s: taking over a stale lock of %s left by %s %s", self.path, self.what, describe(info),
                        gone)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": _command()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Delete the lock file and unlock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._current(fd):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last fd releases the flock


def output_lock(path: str | os.PathLike, what: str = "output") -> OutputLock:
    """The lock `path` for writing `what` (a phrase for the error: "rollout --out runs/x.jsonl")."""
    return OutputLock(path, what)


@contextlib.contextmanager
def setup_lock(path: str | os.PathLike) -> Iterator[None]:
    """Wait for an exclusive flock on `path` (created, kept) for the body; a no-op where it cannot be taken."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a folder not there yet or read-only: the caller's own call reports what is wrong
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
        yield
    finally:
        os.close(fd)


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///path` tracking URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None
