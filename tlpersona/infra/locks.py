"""Exclusive locks on what two processes could share: an output directory, the model cache.

A lock is a ``flock`` on a small file (:mod:`filelock`) that holds the holder's PID. The lock
ends with the process, however it ends; the file stays (it is empty of meaning once unlocked).
An output directory that is locked makes a second run stop at once with one line naming the
holder's PID; the model cache makes a second process wait until the first has finished
fetching or converting the model.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from tlpersona.errors import TlpersonaError

LOCK_NAME = "tlpersona.lock"

#: (thread, directory) locks this process holds: the same thread taking one again is a no-op,
#: not a deadlock; another thread waits for it like another process would
_HELD: set[tuple[int, Path]] = set()


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"


def lock_path(directory: Path) -> Path:
    return directory / LOCK_NAME


@contextmanager
def exclusive(directory: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock of ``directory`` (created if needed) for the ``with`` block.

    ``wait=False``: a lock held elsewhere is a one-line error naming the holder's PID.
    ``wait=True``: wait for it (a line on stderr says whom for). Re-entrant within a thread.
    """
    directory = Path(directory)
    key = (threading.get_ident(), directory.resolve())
    if key in _HELD:
        # this thread holds it already (a command that locks its output directory, then saves)
        yield
        return
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlpersonaError(f"cannot create {directory}: {exc.strerror or exc}") from None
    path = lock_path(directory)
    fresh = not path.exists()
    lock = FileLock(path, on_acquired=_write_pid)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise TlpersonaError(f"{what} {directory} is in use by {_holder(path)} "
                                     f"(lock {path}); wait for it to finish") from None
            print(f"tlpersona: waiting for {_holder(path)}, which holds {path} ...", file=sys.stderr)
            for _ in range(100):
                try:
                    lock.acquire()
                    break
                except FileNotFoundError:
                    # the holder failed and removed the lock file and directory it had made
                    # (filelock itself retries a lock file unlinked under it)
                    directory.mkdir(parents=True, exist_ok=True)
                    created = fresh = True
            else:
                raise TlpersonaError(f"cannot lock {path}: it keeps disappearing")
    except OSError as exc:
        raise TlpersonaError(f"cannot lock {path}: {exc.strerror or exc}") from None
    _HELD.add(key)
    try:
        yield
    except BaseException:
        # A run refused or failed before writing anything leaves no lock file (or directory)
        # of its own behind.
        if fresh:
            path.unlink(missing_ok=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    finally:
        _HELD.discard(key)
        lock.release()
