"""One ``apla-rt tune``: the fp32 mode (references, baseline, candidates), then the auto mode
where it differs, then the folder's ``tuned.json`` entry (``run_tune``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..api import Pipeline
from ..backends.choice import machine_key
from ..backends.placement import Placement, place
from ..engine import GENERATE_NETWORKS, graphs_for
from ..errors import AplaError, OutputExistsError
from ..folder.atomic import check_writable
from ..folder.manifest import Manifest
from ..folder.tuned import TUNED_NAME, is_for, read_tuned, tuned_entry, write_tuned
from ..sampling.deepcache import NETWORKS as CACHE_NETWORKS
from ..sampling.settings import SamplingSettings
from .options import BASELINE_STEPS, TuneOptions, cases_for, label, room
from .search import Bar, Bars, Bench, Progress, Search, seconds_of

MODES = ("fp32", "auto")


def _networks(manifest: Manifest, cache: bool) -> tuple[str, ...]:
    """The graphs a tuned generate runs."""
    return graphs_for(manifest, GENERATE_NETWORKS + (CACHE_NETWORKS if cache else ()))


def _all_fp32(placement: Placement) -> bool:
    return all(c.backend == "ort" and c.precision == "fp32" for c in placement.networks.values())


@dataclass
class _Tune:
    """One ``run_tune``: the folder, its cases and the search over both modes."""

    manifest: Manifest
    options: TuneOptions
    search: Search
    cache: bool
    baseline: SamplingSettings
    reference_steps: int
    placements: dict[str, Placement] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)

    def open(self, mode: str) -> Pipeline:
        o = self.options
        if mode == "fp32":  # ONNX Runtime fp32, the exact reference
            return Pipeline.open(self.manifest.root, "auto", o.threads, cache=self.cache, exact=True)
        return Pipeline.open(self.manifest.root, "auto", o.threads, precision="auto", cache=self.cache)

    def auto_differs(self) -> bool:
        """Whether ``--precision auto`` places any network off ONNX Runtime fp32 (measuring the
        networks where this machine has no measurement yet)."""
        placement = place(self.manifest, _networks(self.manifest, self.cache), "auto", "auto",
                          self.options.threads)
        self.placements["auto"] = placement
        return not _all_fp32(placement)

    def run_mode(self, mode: str, room: int) -> None:
        s = self.search
        with self.open(mode) as pipe:
            self.placements[mode] = pipe.placement
            bench = Bench(pipe, self.manifest.sampling_defaults())
            if mode == "fp32":
                s.reference(bench, self.reference_steps)
                if len(s.references) == len(s.cases):
                    s.baseline(bench, self.baseline)
            if not s.ready or s.out_of_time():
                return
            s.log(f"{mode}: {pipe.describe()}, precision {pipe.describe_precision()}")
            units = bench.units(s.cases[-1], self.cache)
            candidates = self.options.grid.candidates(room, self.cache, self.baseline)
            self.skipped[mode] = s.run_mode(bench, mode, candidates, units)
            s.confirm(bench, mode)

    def mode_entry(self, mode: str) -> dict[str, Any] | None:
        """What ``tuned.json`` records for ``mode``: the chosen setting, its time and PSNR per
        case, the table of the candidates measured and what was skipped."""
        s = self.search
        best = s.best(mode)
        if best is None:
            return None
        name, row = best
        chosen = SamplingSettings.from_dict(row["settings"])
        base = seconds_of(s.progress.row("fp32", self.baseline))
        seconds = seconds_of(row)
        assert seconds is not None and base is not None
        placement = self.placements[mode]
        return {"settings": chosen.replace(guidance=None, guidance_interval=None).to_dict(),
                "setting": name, "seconds": _rounded(seconds), "speedup": round(base / seconds, 3),
                "psnr": {c: v["psnr"] for c, v in row["cases"].items()},
                "placement": {"backend": placement.describe(), "precision": placement.describe_precision()},
                "table": self.table(mode), "skipped": self.skipped.get(mode, {})}

    def table(self, mode: str) -> list[dict[str, Any]]:
        """Every candidate measured in ``mode``, fastest first, with its PSNRs and verdict."""
        s = self.search
        rows = sorted(s.progress.rows(mode).items(), key=lambda kr: seconds_of(kr[1]) or math.inf)
        return [{"setting": k, "estimate_s": r.get("estimate_s"), "seconds": _rounded(seconds_of(r)),
                 "psnr": {c: v["psnr"] for c, v in r["cases"].items()}, "verdict": s.verdict(r)}
                for k, r in rows]

    @staticmethod
    def fp32_for_auto(modes: Mapping[str, Any]) -> str | None:
        """Why ``auto`` takes the fp32 search's setting (in fp32), or None: no setting of the
        measured placement stayed within the budget, or its best measured slower."""
        fp32, auto = modes.get("fp32"), modes.get("auto")
        if fp32 is None:
            return None
        if auto is None:
            return "no setting in the measured placement stayed within the budget"
        if auto["seconds"] > fp32["seconds"]:
            return (f"the measured placement's best ({auto['setting']}, {auto['seconds']:.3g} s) "
                    f"measured slower")
        return None

    def entry(self, one_mode: bool, started: float) -> dict[str, Any]:
        s = self.search
        modes = {m: e for m in MODES if (e := self.mode_entry(m)) is not None}
        why = self.fp32_for_auto(modes) if s.stopped is None else None
        if why is not None:
            same = {k: v for k, v in modes["fp32"].items() if k not in ("table", "skipped")}
            if one_mode:  # the measured placement is ONNX Runtime fp32: one search served both
                modes["auto"] = {**same, "same_as": "fp32"}
            else:  # the fp32 search's setting, run in fp32, is the fastest faithful one
                modes["auto"] = {**same, "same_as": "fp32", "precision": "fp32", "why": why,
                                 "table": self.table("auto"), "skipped": self.skipped.get("auto", {})}
        base = s.progress.row("fp32", self.baseline)
        return {"budget_db": self.options.budget_db, "complete": s.stopped is None, "stopped": s.stopped,
                "one_mode": one_mode, "threads": self.options.threads, "minutes": self.options.minutes,
                "seconds": round(time.monotonic() - started, 1),
                "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "reference": {"solver": "ddim", "steps": self.reference_steps, "precision": "fp32"},
                "baseline": {"setting": label(self.baseline), "seconds": seconds_of(base),
                             "psnr": dict(s.bar_db)},
                "cases": [c.describe() for c in s.cases], "modes": modes}


def _rounded(seconds: float | None) -> float | None:
    """Seconds as ``tuned.json`` records them (the chosen setting's too, so the two compare)."""
    return None if seconds is None else round(seconds, 6)


def _check_existing(manifest: Manifest, machine: Mapping[str, Any], force: bool) -> None:
    """Refuse to replace this machine's complete tuned setting without ``force``, and a folder
    ``tuned.json`` cannot be written to, before anything is measured."""
    existing = tuned_entry(manifest.root, machine)
    if existing is not None and existing.get("complete", True) and not force:
        raise OutputExistsError(f"{manifest.root / TUNED_NAME} already holds the setting tuned for "
                                "this machine; pass --force to tune again")
    check_writable(manifest.root / TUNED_NAME, force=True)


def run_tune(engine_dir: str | Path, options: TuneOptions = TuneOptions(),
             log: Callable[[str], None] | None = None, bars: Bars | None = None) -> dict[str, Any]:
    """Tune the engine folder for this machine (module docstring) and write its ``tuned.json``
    entry, which is returned. ``log`` gets one line per stage; ``bars`` makes progress bars."""
    started = time.monotonic()
    options = options.check()
    log = log or (lambda line: None)
    manifest = Manifest.open(engine_dir)
    manifest.verify()
    machine = machine_key(manifest, options.threads)
    _check_existing(manifest, machine, options.force)
    cases = cases_for(manifest, options.edit_prompt)
    fits = room(manifest, cases)
    cache = all(manifest.has(n) for n in CACHE_NETWORKS) and fits > 1
    baseline = SamplingSettings(steps=min(BASELINE_STEPS, fits), solver="ddim", cache_interval=1,
                                cache_schedule="uniform")
    reference_steps = min(options.reference_steps, fits)
    progress = Progress(manifest.root, {"machine": machine, "cases": [c.describe() for c in cases],
                                        "reference_steps": reference_steps, "baseline": label(baseline)})
    log(f"cases: {', '.join(c.name for c in cases)}; reference DDIM {reference_steps} fp32, baseline "
        f"{label(baseline)} fp32, budget {options.budget_db:g} dB, at most {options.minutes:g} min")
    if progress.runs:
        log(f"resuming: {progress.runs} runs kept in {progress.dir}")
    search = Search(progress, cases, options.budget_db, started + 60 * options.minutes,
                    bars or (lambda desc, total: Bar()), log)
    tune = _Tune(manifest, options, search, cache, baseline, reference_steps)
    tune.run_mode("fp32", fits)
    if not search.ready:
        raise OutOfTime(f"--minutes {options.minutes:g} ran out before the references and the "
                        f"{label(baseline)} baseline were measured; the {progress.runs} runs so far "
                        f"are kept in {progress.dir}: rerun to continue")
    one_mode = search.out_of_time() or not tune.auto_differs()
    if not one_mode:
        tune.run_mode("auto", fits)
    elif not search.out_of_time():
        log("auto: every network measured fastest in ONNX Runtime fp32 here; one mode")
    entry = tune.entry(one_mode, started)
    write_tuned(manifest.root, machine, entry)
    if entry["complete"]:
        progress.remove()
    return entry


class OutOfTime(AplaError):
    """``--minutes`` ran out before anything could be chosen."""


def summary_lines(entry: Mapping[str, Any]) -> Iterator[str]:
    """What a tune chose, one line per mode, and whether it ran out of time."""
    base = entry["baseline"]
    for mode in MODES:
        chosen = entry["modes"].get(mode)
        if chosen is None:
            yield f"{mode}: nothing measured in time; generate keeps the run's setting in {mode}"
            continue
        cases = ", ".join(f"{c} {db:.2f} dB ({base['setting']} {base['psnr'][c]:.2f})"
                          for c, db in chosen["psnr"].items())
        same = (f" in fp32 ({chosen['why']})" if chosen.get("why")
                else " (the same placement as fp32)" if chosen.get("same_as") else "")
        yield (f"{mode}: {chosen['setting']}{same}, {chosen['seconds']:.3g} s a video against "
               f"{base['setting']} fp32's {base['seconds']:.3g} s ({chosen['speedup']:.2f}x); "
               f"PSNR against the reference: {cases}")
    if not entry["complete"]:
        yield ("out of time: chose among the settings measured so far; rerun the same command to "
               "continue the search")


def tuned_here(manifest: Manifest) -> list[tuple[int | None, str]]:
    """(threads, what was chosen) for each of the folder's tuned entries that belongs to this
    machine (at its own thread count)."""
    out = []
    for entry in read_tuned(manifest.root).values():
        threads = entry.get("machine", {}).get("threads")
        if not is_for(entry, machine_key(manifest, threads)):
            continue
        modes = entry.get("modes", {})
        chosen = "; ".join(f"{m}: {e.get('setting')} ({e.get('speedup')}x DDIM 50 fp32)"
                           for m, e in modes.items() if isinstance(e, dict))
        state = "" if entry.get("complete", True) else ", incomplete"
        out.append((threads, f"{chosen or 'nothing chosen'} (budget {entry.get('budget_db')} dB{state})"))
    return out
