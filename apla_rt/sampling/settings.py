"""``SamplingSettings``: everything one video's sampling depends on besides its prompt, its
seed and its start latent, declared, checked and serialised in one place.

    settings = SamplingSettings(steps=20, solver="unipc", cache_interval=3).check()
    resolved = settings.filled(manifest.sampling_defaults())   # the run's defaults where None
    resolved.to_dict()   # {"steps": 20, "guidance": 12.5, "scheduler": "unipc", ...}

``None`` means "the default": the run's setting (the engine folder's
``Manifest.sampling_defaults``), and where the run records none, every step guided and no
cache; ``filled`` resolves them, so what the loop receives is always complete. The CLI flags, ``serve``'s request fields, ``batch``'s job lines and the
``index.json`` records are this object's fields under the same names (``to_dict`` /
``from_dict``), except that the solver keeps diffusers' word there: ``--scheduler`` and the
JSON key ``"scheduler"``. In the code ``solver`` names the sampling algorithm and
``schedule`` the noise schedule (``apla_rt.sampling.schedule``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from .deepcache import check_cache_interval, check_cache_schedule
from .solvers import check_guidance_interval, check_solver

MAX_STEPS = 1000
# attribute -> its name in JSON and on the command line, where the two differ
WIRE_NAMES = {"solver": "scheduler"}


def check_steps(steps: Any, flag: str = "--steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"{flag} must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return int(steps)


def check_guidance(guidance: Any, flag: str = "--guidance") -> float:
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating))
            or not math.isfinite(guidance)):
        raise InputError(f"{flag} must be a finite number, got {guidance!r}")
    return float(guidance)


@dataclass(frozen=True)
class SamplingSettings:
    """How one video is sampled (module docstring); ``check`` before use."""

    steps: int | None = None  # solver steps, 1..MAX_STEPS (None: the run's sample.steps)
    guidance: float | None = None  # classifier-free guidance scale (None: the run's)
    solver: str | None = None  # ddim, dpmpp-2m or unipc (None: the run's sample.scheduler)
    # (lo, hi): step i of N is guided iff lo <= i / N < hi, the others run the UNet on the
    # prompt only; None: every step is guided
    guidance_interval: tuple[float, float] | None = None
    cache_interval: int | None = None  # DeepCache: the full UNet every N-th step (1: off)
    cache_schedule: str | None = None  # "uniform", or "nonuniform": the full steps denser early

    def check(self) -> "SamplingSettings":
        """The same settings, validated and normalised (``guidance_interval`` may be given
        as "lo:hi"); an ``InputError`` naming the CLI flag otherwise."""
        return SamplingSettings(
            steps=None if self.steps is None else check_steps(self.steps),
            guidance=None if self.guidance is None else check_guidance(self.guidance),
            solver=None if self.solver is None else check_solver(self.solver),
            guidance_interval=(None if self.guidance_interval is None
                               else check_guidance_interval(self.guidance_interval)),
            cache_interval=None if self.cache_interval is None else check_cache_interval(self.cache_interval),
            cache_schedule=None if self.cache_schedule is None else check_cache_schedule(self.cache_schedule))

    def over(self, defaults: "SamplingSettings") -> "SamplingSettings":
        """These settings, with ``defaults``' where these are None."""
        return dataclasses.replace(self, **{f.name: getattr(defaults, f.name)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is None})

    def filled(self, defaults: "SamplingSettings") -> "SamplingSettings":
        """Complete settings: these, ``defaults`` where these are None, then no guidance
        interval (every step guided) and no cache; an ``InputError`` naming the flag to pass
        for steps, guidance or the solver where neither gives it."""
        out = self.over(defaults)
        for name in ("steps", "guidance", "solver"):
            if getattr(out, name) is None:
                raise InputError(f"the engine folder does not record the run's {name}; pass "
                                 f"--{WIRE_NAMES.get(name, name)}")
        return dataclasses.replace(out, cache_interval=out.cache_interval or 1,
                                   cache_schedule=out.cache_schedule or "uniform").check()

    def replace(self, **changes: Any) -> "SamplingSettings":
        """A copy with ``changes`` (attribute names, or their JSON names), checked."""
        return dataclasses.replace(self, **_attributes(changes)).check()

    def to_dict(self) -> dict[str, Any]:
        """JSON values under their JSON names (``scheduler`` for ``solver``)."""
        out = {WIRE_NAMES.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        interval = self.guidance_interval
        out["guidance_interval"] = None if interval is None else [float(x) for x in interval]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingSettings":
        """Settings from JSON names (``to_dict``'s); absent keys and nulls take the defaults.
        Unknown keys are an ``InputError``; the values are checked."""
        values = {k: v for k, v in _attributes(data).items() if v is not None}
        return cls(**values).check()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The JSON names of the fields."""
        return tuple(WIRE_NAMES.get(f.name, f.name) for f in dataclasses.fields(cls))


def _attributes(data: Mapping[str, Any]) -> dict[str, Any]:
    """JSON names -> attribute names; an ``InputError`` for a key that is neither."""
    from_wire = {wire: attr for attr, wire in WIRE_NAMES.items()}
    names = {f.name for f in dataclasses.fields(SamplingSettings)}
    out = {}
    for key, value in data.items():
        attr = from_wire.get(key, key)
        if attr not in names:
            raise InputError(f"unknown sampling setting {key!r}; known: "
                             f"{', '.join(SamplingSettings.keys())}")
        out[attr] = value
    return out
