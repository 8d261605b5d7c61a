"""Writing files so that a killed process never leaves half a file, and hashing them."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from tlpersona.errors import TlpersonaError

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
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                        metadata=meta))


def atomic_save_pt(path: Path, obj: object) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


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
