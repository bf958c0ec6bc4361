"""The tune's measurements: the progress folder that keeps them (``Progress``), one opened
pipeline sampling the cases (``Bench``), the time estimate (``Units``) and the search over the
candidates (``Search``)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..api import Pipeline
from ..folder.atomic import write_file, write_text
from ..folder.tuned import machine_id
from ..media.video import psnr
from ..sampling.deepcache import full_steps
from ..sampling.settings import SamplingSettings
from .options import Case, label

# a candidate estimated up to this much slower than the best passing time is still measured:
# the estimate is a sum of per-call times and misses the loop's overheads
SLACK = 0.15
UNIT_STEPS = 4  # steps of the short runs that measure the time per UNet call (``Units``)
IDENTICAL_DB = 999.0  # the PSNR recorded for identical frames
PROGRESS_FORMAT = "apla-tune-progress/1"
CONFIRM_ROUNDS, CONFIRM_MAX = 2, 3  # the side-by-side timing of the fastest passing settings
# A setting that missed by more than this without the cache is not tried with it: DeepCache
# approximates the full UNet's steps, and brought a setting closer to the 500-step reference in
# 14 of 240 pairs of docs/fast_sampling_table.txt, by at most 1.14 dB.
CACHE_GAIN_DB = 1.5
# A setting that missed in fp32 by more than this is not tried in auto: a lower precision adds
# an error of its own (the bf16 UNet moved the tiny run's frames by 52 dB PSNR, issue 25).
PRECISION_GAIN_DB = 0.5


class Progress:
    """What a tune measured so far, in ``.tune-<machine id>/`` in the engine folder: the
    references' frames (``ref-<case>.npy``) and ``progress.json`` (the runs' PSNR and seconds
    per mode and setting). A file written for other cases or reference steps starts afresh."""

    def __init__(self, folder: Path, key: Mapping[str, Any]):
        self.key = json.loads(json.dumps(dict(key)))
        self.dir = folder / f".tune-{machine_id(self.key['machine'])}"
        self.path = self.dir / "progress.json"
        self.data = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("format") == PROGRESS_FORMAT and data.get("key") == self.key:
            return data
        return {"format": PROGRESS_FORMAT, "key": self.key, "references": [], "modes": {}}

    @property
    def runs(self) -> int:
        """How many runs (references and settings' cases) are kept."""
        return len(self.data["references"]) + sum(len(r["cases"]) for rows in self.data["modes"].values()
                                                  for r in rows.values())

    def reference(self, case: str) -> np.ndarray | None:
        if case not in self.data["references"]:
            return None
        try:
            return np.load(self.dir / f"ref-{case}.npy")
        except (OSError, ValueError):
            return None

    def keep_reference(self, case: str, frames: np.ndarray) -> None:
        write_file(self.dir / f"ref-{case}.npy", lambda p: np.save(p, frames, allow_pickle=False), force=True)
        self.data["references"] = sorted(set(self.data["references"]) | {case})
        self.save()

    def rows(self, mode: str) -> dict[str, dict[str, Any]]:
        return self.data["modes"].setdefault(mode, {})

    def row(self, mode: str, s: SamplingSettings) -> dict[str, Any]:
        """``s``'s row in ``mode``, made empty where there is none."""
        return self.rows(mode).setdefault(label(s), {"settings": s.to_dict(), "cases": {}})

    def find(self, mode: str, s: SamplingSettings) -> dict[str, Any] | None:
        return self.data["modes"].get(mode, {}).get(label(s))

    def save(self) -> None:
        write_text(self.path, json.dumps(self.data, indent=1) + "\n", force=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Bar:
    """A progress bar's interface (tqdm's); this one shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


Bars = Callable[[str, int], Bar]  # (description, total) -> a bar


@dataclass(frozen=True)
class Units:
    """Seconds per full UNet call, per shallow (DeepCache) call, per step besides the UNet (VGT,
    solver) and per video besides the loop (text, decode): what ``estimate`` adds up."""

    full: float
    shallow: float
    step: float
    fixed: float

    def estimate(self, s: SamplingSettings) -> float:
        assert s.steps is not None
        n_full = len(full_steps(s.steps, s.cache_interval or 1, s.cache_schedule or "uniform"))
        return (self.fixed + s.steps * self.step + n_full * self.full
                + (s.steps - n_full) * self.shallow)


class Bench:
    """One opened pipeline (one precision mode) sampling the cases with given settings."""

    def __init__(self, pipe: Pipeline, base: SamplingSettings):
        self.pipe = pipe
        self.base = base  # the run's guidance and guidance interval, for every run

    def complete(self, s: SamplingSettings) -> SamplingSettings:
        return s.replace(guidance=self.base.guidance, guidance_interval=self.base.guidance_interval)

    def run(self, case: Case, s: SamplingSettings, bar: Bar | None = None) -> tuple[np.ndarray, float]:
        """One video of ``case`` sampled with ``s``: (frames, seconds without opening and warm-up)."""
        t = self.pipe.timings
        before = t.seconds["load"] + t.seconds["warm-up"]
        started = time.perf_counter()
        video, = self.pipe.generate(case.prompt, case.seed, from_noise=case.from_noise,
                                    settings=self.complete(s),
                                    callback=None if bar is None else (lambda i, ts: bar.update(1)))
        opened = t.seconds["load"] + t.seconds["warm-up"] - before
        return video.frames, time.perf_counter() - started - opened

    def units(self, case: Case, cache: bool) -> Units:
        """``Units`` from short DDIM runs, without and with DeepCache, after one to warm up."""
        plain = SamplingSettings(steps=UNIT_STEPS, solver="ddim", cache_interval=1)
        self.run(case, plain)
        d = self._stages(case, plain)
        shallow = d["unet"]
        if cache:
            c = self._stages(case, plain.replace(cache_interval=UNIT_STEPS, cache_schedule="uniform"))
            shallow = c["unet shallow"]
        return Units(d["unet"], shallow, d["step"], d["fixed"])

    def _stages(self, case: Case, s: SamplingSettings) -> dict[str, float]:
        t = self.pipe.timings
        seconds, calls = dict(t.seconds), dict(t.calls)
        self.run(case, s)

        def per_call(stage: str) -> float:
            n = t.calls[stage] - calls.get(stage, 0)
            return (t.seconds[stage] - seconds.get(stage, 0.0)) / n if n else 0.0

        def spent(*stages: str) -> float:
            return sum(t.seconds[x] - seconds.get(x, 0.0) for x in stages)

        assert s.steps is not None
        return {"unet": per_call("unet"), "unet shallow": per_call("unet shallow"),
                "step": spent("vgt", "solver") / s.steps, "fixed": spent("text encoder", "vae")}


def _db(value: float) -> float:
    return round(min(value, IDENTICAL_DB), 4)


def seconds_of(row: Mapping[str, Any]) -> float | None:
    """A row's time: the median of its side-by-side runs (``Search.confirm``), else over its
    measured cases."""
    times = row.get("confirm_s") or [c["seconds"] for c in row["cases"].values()]
    return float(statistics.median(times)) if times else None


@dataclass
class Search:
    """The measurements of one tune against the cases' references and bars (module docstring)."""

    progress: Progress
    cases: list[Case]
    budget_db: float
    deadline: float
    bars: Bars
    log: Callable[[str], None]
    references: dict[str, np.ndarray] = field(default_factory=dict)
    bar_db: dict[str, float] = field(default_factory=dict)  # DDIM 50 fp32's PSNR per case
    stopped: str | None = None  # why the search ended before its end

    def out_of_time(self) -> bool:
        if self.stopped is None and time.monotonic() > self.deadline:
            self.stopped = "out of time"
        return self.stopped is not None

    def reference(self, bench: Bench, steps: int) -> None:
        """Each case's reference frames: kept from the progress folder, else sampled now."""
        kept_frames = {c.name: self.progress.reference(c.name) for c in self.cases}
        missing = [name for name, frames in kept_frames.items() if frames is None]
        bar = self.bars(f"reference (DDIM {steps} fp32)", steps * len(missing))
        try:
            for case in self.cases:
                kept = kept_frames[case.name]
                if kept is None:
                    if self.out_of_time():
                        return
                    kept, _ = bench.run(case, SamplingSettings(steps=steps, solver="ddim", cache_interval=1), bar)
                    self.progress.keep_reference(case.name, kept)
                self.references[case.name] = kept
        finally:
            bar.close()

    def baseline(self, bench: Bench, s: SamplingSettings) -> None:
        """DDIM 50 fp32 on every case: the bars."""
        assert s.steps is not None
        row = self.progress.row("fp32", s)
        bar = self.bars(f"baseline ({label(s)} fp32)", s.steps * (len(self.cases) - len(row["cases"])))
        try:
            for case in self.cases:
                if case.name not in row["cases"] and not self.out_of_time():
                    self._measure(bench, row, case, s, bar)
        finally:
            bar.close()
        self.bar_db = {k: v["psnr"] for k, v in row["cases"].items()}

    def _measure(self, bench: Bench, row: dict[str, Any], case: Case, s: SamplingSettings,
                 bar: Bar | None = None) -> None:
        frames, seconds = bench.run(case, s, bar)
        row["cases"][case.name] = {"psnr": _db(psnr(frames, self.references[case.name])),
                                   "seconds": round(seconds, 6)}
        self.progress.save()

    @property
    def ready(self) -> bool:
        """The references and the bars are all measured."""
        return len(self.references) == len(self.cases) and len(self.bar_db) == len(self.cases)

    def shortfall(self, row: Mapping[str, Any]) -> tuple[float, str] | None:
        """By how many dB, and in which case, ``row`` most missed its bars (<= 0: it did not),
        over the cases it ran; None where it ran none."""
        short = [(self.bar_db[c.name] - self.budget_db - row["cases"][c.name]["psnr"], c.name)
                 for c in self.cases if c.name in row["cases"]]
        return max(short) if short else None

    def verdict(self, row: Mapping[str, Any]) -> str:
        """"passed", "missed CASE by X dB" or "incomplete"."""
        short = self.shortfall(row)
        if short is not None and short[0] > 1e-9:
            return f"missed {short[1]} by {short[0]:.2f} dB"
        return "passed" if all(c.name in row["cases"] for c in self.cases) else "incomplete"

    def _case_order(self, mode: str) -> list[Case]:
        """The cases missed most often first: a candidate that misses, misses soonest."""
        missed = {c.name: 0 for c in self.cases}
        for row in self.progress.rows(mode).values():
            v = self.verdict(row)
            if v.startswith("missed "):
                missed[v.split()[1]] += 1
        return sorted(self.cases, key=lambda c: -missed[c.name])

    def evaluate(self, bench: Bench, mode: str, s: SamplingSettings) -> dict[str, Any]:
        """``s``'s row in ``mode``, run case after case until one misses or time runs out."""
        row = self.progress.row(mode, s)
        for case in self._case_order(mode):
            if self.verdict(row) != "incomplete" or self.out_of_time():
                break
            if case.name not in row["cases"]:
                self._measure(bench, row, case, s)
        return row

    def best(self, mode: str) -> tuple[str, dict[str, Any]] | None:
        """The fastest passing row of ``mode``: (label, row)."""
        passing = [(k, r) for k, r in self.progress.rows(mode).items() if self.verdict(r) == "passed"]
        return min(passing, key=lambda kr: seconds_of(kr[1]) or math.inf) if passing else None

    def _missed(self, mode: str, s: SamplingSettings, by: float) -> bool:
        """``s`` missed in ``mode`` by more than ``by`` dB."""
        row = self.progress.find(mode, s)
        short = None if row is None else self.shortfall(row)
        return short is not None and short[0] > by

    def _skip(self, mode: str, s: SamplingSettings, estimate: float) -> str | None:
        """Why candidate ``s`` needs no run in ``mode``, or None."""
        best = self.best(mode)
        if best is not None and estimate > (seconds_of(best[1]) or math.inf) * (1 + SLACK):
            return "estimated slower than the best passing"
        if mode != "fp32" and self._missed("fp32", s, PRECISION_GAIN_DB):
            return "missed in fp32"
        uncached = s.replace(cache_interval=1, cache_schedule="uniform")
        if s != uncached and any(self._missed(m, uncached, CACHE_GAIN_DB) for m in {"fp32", mode}):
            return "missed without the cache"
        return None

    def run_mode(self, bench: Bench, mode: str, candidates: list[SamplingSettings],
                 units: Units) -> dict[str, int]:
        """Measure ``mode``'s candidates: without the cache cheapest first, then with it
        cheapest first; a candidate is skipped where ``_skip`` says. How many were skipped, why."""
        order = sorted(candidates, key=lambda s: ((s.cache_interval or 1) > 1, units.estimate(s)))
        skipped: dict[str, int] = {}
        bar = self.bars(f"candidates ({mode})", len(order))
        try:
            for s in order:
                why = "out of time" if self.out_of_time() else self._skip(mode, s, units.estimate(s))
                bar.set_postfix_str(label(s))
                if why is None:
                    self.progress.row(mode, s)["estimate_s"] = round(units.estimate(s), 6)
                    self.evaluate(bench, mode, s)
                else:
                    skipped[why] = skipped.get(why, 0) + 1
                bar.update(1)
        finally:
            bar.close()
        return skipped

    def confirm(self, bench: Bench, mode: str) -> None:
        """Time the passing settings within ``2 * SLACK`` of the fastest (at most
        ``CONFIRM_MAX``) again side by side: ``CONFIRM_ROUNDS`` rounds, each running every one
        of them once on the first case, in turns; their time is then the median of these runs
        (``seconds_of``): on a busy machine one run can be far off."""
        rows = sorted((r for r in self.progress.rows(mode).values() if self.verdict(r) == "passed"),
                      key=lambda r: seconds_of(r) or math.inf)
        fastest = seconds_of(rows[0]) or math.inf if rows else math.inf
        chosen = [r for r in rows if (seconds_of(r) or math.inf) <= fastest * (1 + 2 * SLACK)][:CONFIRM_MAX]
        if len(chosen) < 2:
            return
        bar = self.bars(f"side by side ({mode})", CONFIRM_ROUNDS * len(chosen))
        try:
            for r in range(CONFIRM_ROUNDS):
                for row in chosen[r % len(chosen):] + chosen[:r % len(chosen)]:
                    times = row.setdefault("confirm_s", [])
                    if len(times) <= r and not self.out_of_time():
                        settings = SamplingSettings.from_dict(row["settings"])
                        times.append(round(bench.run(self.cases[0], settings)[1], 6))
                        self.progress.save()
                    bar.update(1)
        finally:
            bar.close()
