"""The tune's options and cases: the grid of candidate settings (``Grid``), the options of one
tune (``TuneOptions``) and the starts and prompts every setting is scored on (``Case``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import InputError
from ..folder.latents import folder_start_timestep
from ..folder.manifest import Manifest
from ..sampling.deepcache import SCHEDULES, check_cache_interval
from ..sampling.settings import SamplingSettings, check_steps
from ..sampling.solvers import SOLVERS, check_solver, noise_timestep

# DDIM steps of the reference solution; docs/tune.md measures it against DDIM 500
REFERENCE_STEPS = 400
BASELINE_STEPS = 50  # DDIM 50 in fp32: Tune-A-Video's sampler, the fidelity to keep
DEFAULT_BUDGET_DB = 1.0
DEFAULT_MINUTES = 60.0
STEP_GRID = (10, 15, 20, 25, 30, 40, 50)
CACHE_GRID = (1, 2, 3, 4)
NOISE_SEED = 0
DEFAULT_EDIT_STYLE = "watercolor painting"  # the edit case's default: the prompt in this style


def _numbers(text: Any, flag: str, parse: Callable[[str], Any]) -> tuple[Any, ...]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise InputError(f"{flag} must list at least one value, got {text!r}")
    try:
        return tuple(dict.fromkeys(parse(s) for s in items))
    except ValueError:
        raise InputError(f"{flag} must be a comma-separated list, got {text!r}") from None


@dataclass(frozen=True)
class Grid:
    """The candidates' settings: every solver at every step count, each with every cache
    interval (1 = off) and, above 1, every cache schedule."""

    solvers: tuple[str, ...] = SOLVERS
    steps: tuple[int, ...] = STEP_GRID
    cache_intervals: tuple[int, ...] = CACHE_GRID
    cache_schedules: tuple[str, ...] = SCHEDULES

    @classmethod
    def parse(cls, solvers: str | None = None, steps: str | None = None,
              cache_intervals: str | None = None) -> "Grid":
        """A grid from the CLI's comma-separated lists (None: the default's)."""
        d = cls()
        return cls(
            d.solvers if solvers is None else tuple(check_solver(s, "--solvers")
                                                    for s in _numbers(solvers, "--solvers", str)),
            d.steps if steps is None else tuple(check_steps(int(n), "--steps")
                                                for n in _numbers(steps, "--steps", int)),
            d.cache_intervals if cache_intervals is None else tuple(
                check_cache_interval(int(n), "--cache-intervals")
                for n in _numbers(cache_intervals, "--cache-intervals", int)))

    def candidates(self, room: int, cache: bool, baseline: SamplingSettings) -> list[SamplingSettings]:
        """The grid's settings that fit ``room`` steps (cache intervals above 1 only where the
        folder has the cache graphs, and below the step count), and the baseline."""
        out = [baseline]
        for solver, steps, interval in itertools.product(self.solvers, self.steps, self.cache_intervals):
            if steps > room or (interval > 1 and (not cache or interval >= steps)):
                continue
            for schedule in (("uniform",) if interval == 1 else self.cache_schedules):
                out.append(SamplingSettings(steps=steps, solver=solver, cache_interval=interval,
                                            cache_schedule=schedule))
        return list(dict.fromkeys(out))


def _positive(value: Any, flag: str, unit: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{flag} must be a positive number of {unit}, got {value!r}")
    return number


@dataclass(frozen=True)
class TuneOptions:
    """What ``run_tune`` searches and how long (module docstring); ``check`` before use."""

    budget_db: float = DEFAULT_BUDGET_DB  # how far below DDIM 50 fp32's PSNR a candidate may be
    minutes: float = DEFAULT_MINUTES  # this invocation's time bound
    threads: int | None = None  # as generate's --threads: the tuned entry is per thread count
    edit_prompt: str | None = None  # the edit case's prompt (None: the prompt in a style)
    force: bool = False  # tune again where this machine has a complete tuned setting
    grid: Grid = Grid()
    reference_steps: int = REFERENCE_STEPS

    def check(self) -> "TuneOptions":
        from ..backends.placement import check_threads

        check_threads(self.threads)
        if self.edit_prompt is not None and not str(self.edit_prompt).strip():
            raise InputError("--edit-prompt must not be empty")
        return TuneOptions(_positive(self.budget_db, "--budget-db", "dB"),
                           _positive(self.minutes, "--minutes", "minutes"), self.threads,
                           self.edit_prompt, bool(self.force), self.grid,
                           check_steps(self.reference_steps, "--reference-steps"))


def label(s: SamplingSettings) -> str:
    """"unipc 20" or "unipc 20, cache 3 nonuniform"."""
    cache = f", cache {s.cache_interval} {s.cache_schedule}" if (s.cache_interval or 1) > 1 else ""
    return f"{s.solver} {s.steps}{cache}"


@dataclass(frozen=True)
class Case:
    """One start and prompt every setting is scored on."""

    name: str
    prompt: str
    from_noise: bool
    start_timestep: int
    seed: int = NOISE_SEED

    def describe(self) -> dict[str, Any]:
        start = f"seeded noise (seed {self.seed})" if self.from_noise else "the folder's start latent"
        return {"name": self.name, "prompt": self.prompt, "start": start,
                "start_timestep": self.start_timestep}


def cases_for(manifest: Manifest, edit_prompt: str | None) -> list[Case]:
    """The cases of a folder (module docstring)."""
    prompt = manifest.prompt
    if not prompt:
        raise InputError(f"the engine folder {manifest.root} records no training prompt to tune on; "
                         "re-export the run")
    noise = Case("noise", prompt, True, noise_timestep(manifest.scheduler))
    if manifest.start_latent_path is None:
        return [noise]
    t0 = folder_start_timestep(manifest)
    edit = edit_prompt or f"{prompt}, {DEFAULT_EDIT_STYLE}"
    return [Case("recon", prompt, False, t0), Case("edit", edit, False, t0), noise]


def room(manifest: Manifest, cases: Sequence[Case]) -> int:
    """The most steps that fit from every case's start timestep."""
    return min(c.start_timestep - manifest.scheduler.steps_offset + 1 for c in cases)


