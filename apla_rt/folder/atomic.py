"""Atomic outputs: nothing half-written ever sits at a final path.

Files are written to a temporary sibling, fsynced and renamed into place; folders are
built in a temporary sibling and swapped in with renames. An existing output is only
replaced when ``force`` is true.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import AplaError, OutputExistsError


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output without ``force`` and a parent we cannot write to."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:  # the folders to create: check the first that exists
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise AplaError(f"cannot write {path}: {parent} is not a folder")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise AplaError(f"cannot write {path}: folder {parent} is not writable")
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AplaError(f"cannot write {path}: {err.strerror or err} ({err.filename or path.parent})") from err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: str | os.PathLike, write: Callable[[Path], object], force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically."""
    path = check_writable(path, force)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal modes
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise AplaError(f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    return write_file(path, lambda p: p.write_bytes(data), force=force)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), force=force)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling; on success swap it in for ``path``.

    On any failure the temporary folder is removed and an existing ``path`` is left
    exactly as it was.
    """
    path = check_writable(path, force)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
