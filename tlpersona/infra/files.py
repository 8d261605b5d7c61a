"""Writing files so that a killed process never leaves half a file (nor a directory half of one
run and half of another), and hashing them."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tlpersona.errors import TlpersonaError

if TYPE_CHECKING:  # torch loads in seconds: the checks that import this module run without it
    import torch

# mkstemp creates files readable by their owner only; a renamed result should get the mode any
# other new file gets (0666 less the umask). Read once, while importing is single-threaded.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp)`` and rename onto ``path``; on any failure the temporary file
    is removed and ``path`` is untouched. OS errors (disk full, permissions) become one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
    except OSError as exc:
        raise TlpersonaError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise TlpersonaError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """Atomic write through a writer that takes a file name (a library that opens the file
    itself)."""
    _atomic(path, write)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                        metadata=meta))


def atomic_save_pt(path: Path, obj: object) -> None:
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


#: Where a directory's replacement is written before it is swapped in: a hidden sibling.
_PARTIAL = ".{}.tlpersona-partial-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swap directories ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    that ``b`` is never missing; where the system cannot, by three renames."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(b))
    aside = a.with_name(a.name + "-old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _stale_partials(target: Path) -> list[Path]:
    """Partial directories of ``target`` a killed process left, beside it or inside it."""
    pattern = re.compile(re.escape(_PARTIAL.format(target.name)) + r"[A-Za-z0-9_]{8}(-old)?")
    where = [target.parent, *([target] if target.is_dir() else [])]
    return [p for d in where for p in d.iterdir()
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def _swappable(target: Path) -> bool:
    """Whether ``target`` can be replaced whole by a sibling: its parent is writable, on the
    same filesystem, and ``target`` is not a mount point (a container's volume, a scratch
    directory under a root-owned parent)."""
    parent = target.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return False
    if target.is_dir() and (os.path.ismount(target) or target.stat().st_dev != parent.stat().st_dev):
        return False
    return True


def _replace_entries(stage: Path, target: Path, keep: Sequence[str], last: str | None) -> None:
    """``target``'s entries replaced by ``stage``'s one by one (where the whole directory cannot
    be swapped), ``last`` moved last: until it is there the set reads as unfinished."""
    for entry in target.iterdir():
        if entry.name in keep or entry == stage or ".tlpersona-partial-" in entry.name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    names = sorted(p.name for p in stage.iterdir() if p.name not in keep)
    for name in sorted(names, key=lambda n: n == last):
        shutil.move(str(stage / name), str(target / name))


@contextmanager
def replaced_dir(target: Path, carry: Sequence[str] = (), last: str | None = None
                 ) -> Iterator[Path]:
    """A new, empty directory to write ``target``'s whole new content into; when the block ends
    it takes ``target``'s place in one step and the old content is removed. A failure (or a
    kill) in the block leaves ``target`` as it was. ``carry``: names in ``target`` that stay
    the same file (hard links: the lock a process holds on ``target`` stays held).

    Where ``target`` cannot be swapped whole (see :func:`_swappable`, or the system refuses the
    swap) the new content is written inside it and moved into place entry by entry, ``last``
    at the end; a kill then can leave a mixed set without its ``last`` file.

    The caller holds ``target``'s lock: partial directories of ``target`` left by a killed
    process are removed here, but an old set a killed three-rename swap left aside is put back
    when ``target`` lost it."""
    target = target.resolve()  # a link to the directory stays a link to it
    try:
        _recover(target, last)
        swap = _swappable(target)
        stage = Path(tempfile.mkdtemp(prefix=_PARTIAL.format(target.name),
                                      dir=target.parent if swap else target))
        os.chmod(stage, stat.S_IMODE(target.stat().st_mode))
    except OSError as exc:
        raise TlpersonaError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        yield stage
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise TlpersonaError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        if swap:
            for name in carry:
                if (target / name).is_file():
                    os.link(target / name, stage / name)
            try:
                _exchange(stage, target)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EBUSY, errno.EPERM, errno.EACCES):
                    raise
                _replace_entries(stage, target, carry, last)
        else:
            _replace_entries(stage, target, carry, last)
    except OSError as exc:
        # the finished set stays where it is: a failed swap must not lose it
        raise TlpersonaError(f"cannot move the results into {target} ({exc.strerror or exc}); "
                             f"they are in {stage}") from None
    shutil.rmtree(stage, ignore_errors=True)  # the old content (or nothing), under the stage's name


def _recover(target: Path, last: str | None) -> None:
    """Undo what a killed swap left: an old set moved aside (``-old``) comes back where
    ``target`` has no finished set; every other partial directory is removed."""
    stale = _stale_partials(target)
    olds = [p for p in stale if p.name.endswith("-old")]
    finished = last is None or (target / last).exists()
    if olds and not finished:
        target.mkdir(exist_ok=True)
        for entry in olds[0].iterdir():
            if not (target / entry.name).exists():
                os.rename(entry, target / entry.name)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def json_bytes(obj: object) -> bytes:
    """Strict JSON (indented) of a results object: NaN and infinities become ``null``, which
    every JSON reader accepts (bare ``NaN`` is not JSON)."""
    def clean(x: object) -> object:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=1, allow_nan=False).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
