"""The lock that keeps two writers (``apla-export``, ``apla-export --int8 --engine-dir``) off
one engine folder: a ``.NAME.lock`` file beside it, held with ``flock`` while the folder is built."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

from apla_rt.errors import AplaError


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock, or refuse in one line while another writer holds it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    fh = open(lock_path, "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AplaError(f"another apla-export is writing {out}; wait for it to finish") from None
        yield
    finally:
        fh.close()
