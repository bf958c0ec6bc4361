"""The Generate tab's work: sampling settings, opened pipelines, and each generation saved
as a folder of videos with a ``result.json`` saying how they were made.

Everything the page sends to sampling is one dict (``sampling_settings``), passed whole to
``Pipeline.generate`` and recorded whole in ``result.json``; the options that choose how an
engine folder is opened (backend, precision, VGT) are another (``open_options``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from apla_rt.folder import atomic
from apla_rt.errors import InputError

from .workspace import Workspace, write_json

KEEP_OPEN = 2  # opened engine folders kept for the next generation


def runtime_choices() -> dict[str, tuple[str, ...]]:
    """The values the runtime takes for its choice settings (its own lists)."""
    from apla_rt.backends.precision import PRECISIONS
    from apla_rt.sampling.deepcache import SCHEDULES
    from apla_rt.backends.placement import BACKENDS
    from apla_rt.sampling.solvers import SOLVERS

    return {"scheduler": tuple(SOLVERS), "backend": tuple(BACKENDS),
            "precision": tuple(PRECISIONS), "cache_schedule": tuple(SCHEDULES)}


def _whole(value: Any, name: str) -> int | None:
    """A whole number from a field (a number, or text); empty: None."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{name} must be a whole number (got {value!r})") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InputError(f"{name} must be a whole number (got {value!r})")
    return int(value)


def sampling_settings(*, steps: Any = None, guidance: Any = None, scheduler: str | None = None,
                      guidance_interval: str = "", cache_interval: Any = None,
                      cache_schedule: str | None = None, frames: Any = None,
                      negative_prompt: str = "", from_noise: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``Pipeline.generate`` from the page's fields: the sampling
    settings (``apla_rt.SamplingSettings``' fields; empty: the default, the run's or the one
    tuned for this machine) and the request's. Ranges are checked by the pipeline itself."""
    interval = None
    text = (guidance_interval or "").strip()
    if text:
        parts = text.split(":")
        try:
            lo, hi = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
        except ValueError:
            lo = hi = math.nan
        interval = (lo, hi)
    if guidance is not None and guidance != "" and not isinstance(guidance, (int, float)):
        raise InputError(f"guidance must be a number (got {guidance!r})")
    return {"steps": _whole(steps, "steps"),
            "guidance": None if guidance in (None, "") else float(guidance),
            "scheduler": scheduler or None, "guidance_interval": interval,
            "cache_interval": _whole(cache_interval, "cache interval"),
            "cache_schedule": cache_schedule or None, "frames": _whole(frames, "frames"),
            "negative_prompt": negative_prompt or "", "from_noise": bool(from_noise)}


def open_options(backend: str = "auto", precision: str = "auto", use_vgt: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``Pipeline.open`` that the page chooses."""
    return {"backend": backend or "auto", "precision": precision or "auto", "use_vgt": bool(use_vgt)}


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise InputError("give at least one prompt (one per line)")
    return prompts


def parse_seeds(text: str) -> list[int]:
    items = (text or "").replace(",", " ").split()
    try:
        seeds = [int(s) for s in items] or [0]
    except ValueError as err:
        raise InputError(f"seeds must be whole numbers separated by commas or spaces (got {text!r})") from err
    if any(not 0 <= s < 2**63 for s in seeds):
        raise InputError("seeds must be between 0 and 2**63 - 1")
    return list(dict.fromkeys(seeds))


class Pipelines:
    """Opened engine folders, the last ``KEEP_OPEN`` kept; one generation at a time."""

    def __init__(self, workspace: Workspace, threads: int | None = None):
        self.ws = workspace
        self.threads = threads
        self.lock = threading.RLock()
        self._open: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, engine: str, options: dict[str, Any]) -> Any:
        """The ``Pipeline`` of ``engines/ENGINE`` opened with ``options`` (reopened when the
        folder was exported again)."""
        from apla_rt import Pipeline

        folder = self.ws.engines / engine
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise InputError(f"{self.ws.rel(folder)} is not an engine folder (no manifest.json); "
                             "export a run first")
        key = (engine, manifest.stat().st_mtime_ns, tuple(sorted(options.items())))
        with self.lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
            pipe = Pipeline.open(folder, threads=self.threads, **options)
            self._open[key] = pipe
            while len(self._open) > KEEP_OPEN:
                self._open.popitem(last=False)[1].close()
            return pipe

    def close(self) -> None:
        with self.lock:
            for pipe in self._open.values():
                pipe.close()
            self._open.clear()


def video_record(video: Any, file: str) -> dict[str, Any]:
    frames = video.frames
    record = {"file": file, **video.record(), "batch_size": video.batch_size, "fps": video.fps}
    record.update(frames=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]),
                  duration_s=round(frames.shape[0] / float(video.fps), 4))
    return record


def generate(ws: Workspace, pipes: Pipelines, engine: str, prompts: list[str], seeds: list[int],
             settings: dict[str, Any], options: dict[str, Any],
             progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Every prompt with every seed, through the pipeline's batching; the videos and
    ``result.json`` are written as one folder ``videos/generated/ENGINE/NNNN`` once all are
    made (nothing is written when the pipeline refuses a setting). Returns the record."""
    pairs = [(p, s) for p in prompts for s in seeds]
    with pipes.lock:
        pipe = pipes.get(engine, options)
        steps = settings.get("steps") or pipe.settings_for().steps
        batches = math.ceil(len(pairs) / max(1, pipe.max_batch))
        calls = [0]

        def step(_index: int, _timestep: int) -> None:
            calls[0] += 1
            if progress is not None:
                progress(min(1.0, calls[0] / (steps * batches)), "sampling")

        before = dict(pipe.timings.seconds)
        start = time.perf_counter()
        videos = pipe.generate([p for p, _ in pairs], [s for _, s in pairs], callback=step, **settings)
        seconds = time.perf_counter() - start
        stages = {k: round(v - before.get(k, 0.0), 4) for k, v in pipe.timings.seconds.items()
                  if v - before.get(k, 0.0) > 0}
        record: dict[str, Any] = {
            "engine": engine, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prompts": prompts, "seeds": seeds,
            "settings": {**settings, "guidance_interval": (list(settings["guidance_interval"])
                                                           if settings.get("guidance_interval") else None)},
            "open": options, "backend": pipe.describe(), "precision": pipe.describe_precision(),
            "seconds": round(seconds, 3), "stages": stages, "videos": []}
        folder = ws.new_result_folder(engine)
        with atomic.atomic_dir(folder) as tmp:
            for i, video in enumerate(videos):
                name = f"{i:03d}-seed{video.seed}.mp4"
                video.save(Path(tmp) / name)
                record["videos"].append(video_record(video, name))
            record["id"] = f"{engine}/{folder.name}"
            write_json(Path(tmp) / "result.json", record)
    return {**record, "folder": str(folder)}
