"""The deep/shallow UNet cache (DeepCache, Ma et al., CVPR 2024) in the sampling loop.

At the plan's full steps the loop runs ``unet_feature`` (the whole UNet, which also returns
the up-path feature entering the cached skip branch) and keeps that feature; at the other
steps it runs ``unet_shallow`` (conv_in, the time embedding, the outer down block(s), the
up blocks from the cut on, conv_out) on the kept feature. The graphs and the branch they cut
at come from the export (``apla_train.deepcache``; the manifest's ``deepcache`` entry).

``--cache-interval N`` (1 = off: the plain ``unet`` graph, today's loop exactly):

* ``uniform``: full steps 0, N, 2N, ...;
* ``nonuniform``: as many full steps, ceil(steps / N), placed denser early (DeepCache's
  non-uniform schedule concentrates them where the feature changes fastest; here at
  ``floor(steps * (k / K) ** NONUNIFORM_POWER)`` for k = 0..K-1, made strictly increasing).

Rows: a UNet call runs on 2n rows ([uncond, cond]) with guidance, n (the cond rows) without.
A feature cached from 2n rows serves an n-row step with its cond half; a step that needs
rows the cache does not hold (2n after an n-row full step) runs full and refreshes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

FULL_NETWORK = "unet_feature"
SHALLOW_NETWORK = "unet_shallow"
NETWORKS = (FULL_NETWORK, SHALLOW_NETWORK)
SCHEDULES = ("uniform", "nonuniform")
NONUNIFORM_POWER = 1.4  # DeepCache's default exponent of its non-uniform schedule
MAX_INTERVAL = 1000


def check_cache_interval(value: Any, flag: str = "--cache-interval") -> int:
    """An integer from 1 (no cache) to ``MAX_INTERVAL``; ``InputError`` otherwise."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or not 1 <= value <= MAX_INTERVAL):
        raise InputError(f"{flag} must be an integer from 1 (no cache) to {MAX_INTERVAL}, got {value!r}")
    return int(value)


def check_cache_schedule(value: Any, flag: str = "--cache-schedule") -> str:
    if value not in SCHEDULES:
        raise InputError(f"{flag} must be one of {', '.join(SCHEDULES)}, got {value!r}")
    return str(value)


def full_steps(steps: int, interval: int, schedule: str = "uniform") -> tuple[int, ...]:
    """The step indices (0-based, ascending, always with 0) at which the full UNet runs."""
    if interval <= 1:
        return tuple(range(steps))
    count = math.ceil(steps / interval)
    if schedule == "uniform":
        return tuple(range(0, steps, interval))
    check_cache_schedule(schedule)
    out: list[int] = []
    for k in range(count):
        at = int(math.floor(steps * (k / count) ** NONUNIFORM_POWER))
        out.append(max(at, out[-1] + 1) if out else 0)
    return tuple(out)


@dataclass
class FeatureCache:
    """One sampling run's cache: which steps run full, the feature kept, the calls made.

    The sampling loop (``apla_rt.sampling.loop.walk``) asks ``feature_for`` (None: run the
    full graph), then hands the call's outputs to ``record``, which also moves to the next
    step."""

    full: tuple[bool, ...]
    step: int = 0
    feature: np.ndarray | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"full": 0, "shallow": 0})

    @classmethod
    def plan(cls, steps: int, interval: int, schedule: str = "uniform") -> "FeatureCache":
        at = set(full_steps(steps, interval, schedule))
        return cls(tuple(i in at for i in range(steps)))

    def feature_for(self, rows: int) -> np.ndarray | None:
        """The kept feature for a UNet call on ``rows`` rows at this step, or None when the
        step runs full: planned, nothing kept yet, or not the rows needed."""
        if self.feature is None or self.step >= len(self.full) or self.full[self.step]:
            return None
        have = self.feature.shape[0]
        if have == rows:
            return self.feature
        if have == 2 * rows:  # kept from a guided step: the cond rows (the second half)
            return self.feature[rows:]
        return None

    def record(self, feature: np.ndarray | None) -> None:
        """After the step's UNet call: ``feature`` from a full call, None from a shallow one."""
        if feature is None:
            self.calls["shallow"] += 1
        else:
            self.calls["full"] += 1
            self.feature = np.ascontiguousarray(feature, dtype=np.float32)
        self.step += 1
