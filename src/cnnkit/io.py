"""Small file helpers: atomic writes, YAML."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from cnnkit.errors import CnnkitError, OutputError

_WHY = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EEXIST: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}
_WRITE_WORDS = ("no space", "write", "permission", "read-only", "disk quota")


def why_not_written(exc: BaseException) -> str | None:
    """Why a write failed, in words, when ``exc`` is a failed write (an ``OSError``, or the text of
    PyTorch's or safetensors' writers: "PytorchStreamWriter failed writing file"); None otherwise."""
    if isinstance(exc, OSError):
        return _WHY.get(exc.errno or 0, exc.strerror or str(exc))
    text = str(exc).lower()
    if any(w in text for w in _WRITE_WORDS):
        return "the disk is full" if "space" in text or "file write failed" in text else "the write failed"
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write of ``path`` into one :class:`OutputError` line naming it and the reason."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        why = why_not_written(exc)
        if why is None:
            raise
        raise OutputError(f"{path}: cannot write: {why}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` in one step.

    A crash or kill during the write leaves the previous file intact (rename is atomic on POSIX), and
    a failed write (disk full, read-only folder) raises :class:`OutputError` with the previous file
    still in place.
    """
    target = Path(path)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            if tmp_path.exists() and not tmp_path.is_symlink():  # mkstemp's 0600 -> what open() would give
                os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_dir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p path``, or an :class:`OutputError` that says why not."""
    with writing(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CnnkitError(f"{path}: cannot read YAML ({exc})") from None
    if not isinstance(data, dict):
        raise CnnkitError(f"{path}: expected a mapping at the top level")
    return data
