"""The workspace: plain folders that ``apla-train``, ``apla-export`` and ``apla-rt`` use as
they are, plus one JSON record per job.

Layout (paths relative to the workspace; the CLIs run with it as their working folder)::

    runs/NAME/                  apla-train's run folder
    engines/NAME/               apla-export's engine folder
    videos/clips/NAME.EXT       the clip a run was trained on (uploaded or an example)
    videos/generated/NAME/NNNN/ one generation on engines/NAME: NNN-seedS.mp4 + result.json
    jobs/NNNN.json, NNNN.log    a background job's record and its processes' output
    .apla-ui.lock               held by the apla-ui serving the workspace

Everything is written atomically (``apla_rt.atomic``): a crash leaves either nothing or a
whole file or folder at a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

from apla_rt.folder import atomic
from apla_rt.errors import AplaError, InputError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")


def check_name(name: str, what: str = "name") -> str:
    """A run, engine or result name: letters, digits, '.', '_', '-' (a folder name anywhere)."""
    name = (name or "").strip()
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise InputError(f"{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def name_from(text: str) -> str:
    """A name made from free text (a clip's file name), for a default."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).stem).strip("-._")[:48]
    return name or "run"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None where the file is missing or not one (a record from elsewhere)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n", force=True)


class Workspace:
    """The folders of one workspace (nothing is created until something is written)."""

    def __init__(self, root: str | os.PathLike):
        self.given = str(root)  # as the user named it, for display
        self.root = Path(root).expanduser().resolve()
        self._lock: IO[str] | None = None

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    @property
    def clips(self) -> Path:
        return self.root / "videos" / "clips"

    @property
    def generated(self) -> Path:
        return self.root / "videos" / "generated"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def rel(self, path: Path) -> str:
        """``path`` as the CLIs get it: relative to the workspace."""
        return str(path.relative_to(self.root))

    def lock(self) -> None:
        """Hold the workspace for this process: two apla-ui on one workspace would each run
        their own job queue and could write the same folders."""
        import fcntl

        if not self.root.is_dir():
            try:
                self.root.mkdir(parents=True)
            except OSError as err:
                raise AplaError(f"cannot create the workspace {self.root}: {err.strerror or err}") from err
        handle = open(self.root / ".apla-ui.lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise AplaError(f"the workspace {self.root} is already served by apla-ui ({holder}); "
                            "stop it or choose another --workspace") from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    # -- what the workspace holds ---------------------------------------------------------

    def run_names(self) -> list[str]:
        """Run folders (with ``config.json``), whoever made them."""
        return sorted(p.parent.name for p in self.runs.glob("*/config.json"))

    def engine_names(self) -> list[str]:
        """Engine folders (with ``manifest.json``), whoever made them."""
        return sorted(p.parent.name for p in self.engines.glob("*/manifest.json"))

    def name_taken(self, name: str) -> str | None:
        """What already uses ``name`` as a run, engine or clip, or None."""
        for folder, what in ((self.runs, "a run"), (self.engines, "an engine folder")):
            if (folder / name).exists():
                return f"{what} {self.rel(folder / name)}"
        for path in self.clips.glob(f"{name}.*"):
            if path.stem == name:
                return f"the clip {self.rel(path)}"
        return None

    def store_clip(self, source: Path, name: str) -> Path:
        """Copy a checked clip to ``videos/clips/NAME.EXT`` (a temporary name, then renamed)."""
        target = self.clips / f"{name}{source.suffix.lower()}"
        atomic.write_file(target, lambda tmp: shutil.copyfile(source, tmp))
        return target

    def results(self, engine: str) -> list[dict[str, Any]]:
        """The generations on ``engines/NAME``, newest first, each its ``result.json`` with
        ``folder`` (absolute) added."""
        out = []
        for path in sorted((self.generated / engine).glob("*/result.json"), reverse=True):
            record = read_json(path)
            if record is not None:
                out.append({**record, "folder": str(path.parent)})
        return out

    def new_result_folder(self, engine: str) -> Path:
        """The next free ``videos/generated/NAME/NNNN`` (not created)."""
        folder = self.generated / engine
        taken = [int(p.name) for p in folder.glob("[0-9][0-9][0-9][0-9]*") if p.name.isdigit()]
        return folder / f"{max(taken, default=0) + 1:04d}"

    def examples(self) -> list[Path]:
        """The clips shipped in the repository's ``examples/`` (an editable install has them)."""
        folder = Path(__file__).resolve().parents[1] / "examples"
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
