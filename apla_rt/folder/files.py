"""The files an engine folder's manifest names: paths kept inside the folder, and the sha256
checks that make what is loaded what was exported.

Every path the manifest names is relative and stays inside the folder (no ``..``, no absolute
path, no symlink pointing out: ``safe_path``). A file is checked against its sha256 in the
manifest's ``files`` when it is used (``check_file``), hashed by ``sha256_file`` in 1 MiB blocks;
a mismatch or a missing file is an ``IntegrityError`` naming it. ``Verification`` runs such
checks in a thread while the caller loads the same files.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Mapping

from ..errors import IntegrityError

_CHUNK = 1 << 20


def invalid_manifest(message: str) -> IntegrityError:
    """The error for a manifest that breaks its format (the export wrote something else)."""
    return IntegrityError(f"invalid manifest: {message}; re-run the export")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB blocks (``OSError`` if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- paths


def safe_path(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` (symlinks resolved)."""
    if not isinstance(rel, str) or not rel.strip():
        raise invalid_manifest(f"{what} must be a non-empty relative path, got {rel!r}")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith(("/", "\\")):
        raise IntegrityError(f"{what} {rel!r} is an absolute path; the manifest may only name "
                             "files inside the engine folder")
    if ".." in posix.parts or ".." in windows.parts:
        raise IntegrityError(f"{what} {rel!r} points outside the engine folder ('..'); refusing it")
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise IntegrityError(f"{what} {rel!r} resolves outside the engine folder (a symlink to "
                             f"{real}); refusing it")
    return path


def optional_path(root: Path, rel: Any, what: str) -> Path | None:
    """``safe_path``, or None where the manifest names no file (``rel`` is None)."""
    return None if rel is None else safe_path(root, rel, what)


def listed_under(files: Iterable[str], rels: Iterable[str]) -> list[str]:
    """The listed ``files`` each of ``rels`` stands for: itself, or every listed file inside it
    (a folder such as the tokenizer's), in order and without repeats. A path that stands for
    no listed file is an ``IntegrityError``."""
    listed = list(files)
    wanted: list[str] = []
    for rel in rels:
        inside = [f for f in listed if f == rel or f.startswith(rel.rstrip("/") + "/")]
        if not inside:
            raise invalid_manifest(f"{rel} is used but has no sha256 in 'files'")
        wanted += [f for f in inside if f not in wanted]
    return wanted


# --------------------------------------------------------------------------- checks


def check_file(root: Path, rel: str, files: Mapping[str, str], digest: Callable[[Path], str]) -> None:
    """The listed file ``rel`` exists and ``digest`` of it is its sha256 in ``files``."""
    path = safe_path(root, rel, "files entry")
    if not path.is_file():
        raise IntegrityError(f"{rel} is listed in the manifest but missing from {root}; "
                             "re-run the export")
    if digest(path) != files[rel]:
        raise IntegrityError(f"{rel} does not match its sha256 in the manifest (corrupted or "
                             "modified); re-run the export")


class Verification:
    """Files being checked in a thread (``Manifest.verify_in_background``): ``check(rel)`` for
    each of ``rels``; ``wait`` hands the first error to the caller."""

    def __init__(self, check: Callable[[str], None], rels: list[str]):
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if rels:
            self._thread = threading.Thread(target=self._run, args=(check, rels),
                                            name="apla-verify", daemon=True)
            self._thread.start()

    def _run(self, check: Callable[[str], None], rels: list[str]) -> None:
        try:
            for rel in rels:
                check(rel)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            self._error = err

    def wait(self) -> None:
        """Block until every file is hashed; raise the first ``IntegrityError`` (or I/O error)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
