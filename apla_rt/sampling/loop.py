"""The sampling loop (spec section 5), written out: at each timestep the UNet, classifier-free
guidance, the VGT's perturbation and the solver's step.

For n videos with start latents z (n, c, f, h, w)::

    for i, t in enumerate(solver.timesteps):                      descending
        guided = step i is in the guidance interval               (lo <= i / N < hi)
        eps    = UNet([z, z] if guided else z, t, text)           [uncond; cond] rows, or cond only
                 (DeepCache: the full graph at planned steps, keeping its feature; the shallow
                 graph on that feature in between)
        if guided:  eps = eps_u + s (eps_c - eps_u)               s: one scale per video
        if VGT:     eps = eps + VGT(z, t [, clean source])        APLA's perturbation
        z = solver.step(eps, t, z)                                float64 NumPy
    return z

The same loop inverts a clip (``DDIMInversion`` as the solver, the empty prompt, no guidance).
It only calls networks and the solver: the networks are opened, warmed up and handed the text
before it starts (``apla_rt.backends.pool.RunnerPool``, which also splits a call into the
chunks a network's profile takes and runs the two guidance halves side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np

from .deepcache import FULL_NETWORK, SHALLOW_NETWORK, FeatureCache
from .timings import Timings

StepCallback = Callable[[int, int], None]  # (step index, timestep)


class Networks(Protocol):
    """What the loop calls (``apla_rt.backends.pool.RunnerPool``)."""

    timings: Timings

    def unet(self, graph: str, feeds: Mapping[str, np.ndarray], halves: bool) -> dict[str, np.ndarray]:
        """The UNet graph ``graph`` on ``feeds``; ``halves``: the rows are a guidance batch
        [uncond; cond], which may run as two calls side by side."""

    def vgt(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The VGT's perturbation of the predicted noise."""


class Solver(Protocol):
    timesteps: np.ndarray

    def step(self, eps: np.ndarray, t: int, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Conditioning:
    """What the loop conditions on, besides the latents.

    ``text``: (2n, seq, hidden) = [n uncond rows; n cond rows] with guidance, (n, ...) without
    (``scale`` None). ``scale``: the guidance scale per video (n,). ``guided``: per step,
    whether it runs guided (the guidance interval). ``source``: the clean latents (n, ...) a
    ``vgt.source`` VGT reads, else None. ``vgt``: add the VGT's perturbation."""

    text: np.ndarray
    scale: np.ndarray | None
    guided: np.ndarray | None
    vgt: bool
    source: np.ndarray | None = None

    def guided_at(self, i: int) -> bool:
        return self.scale is not None and (self.guided is None or bool(self.guided[i]))


def walk(nets: Networks, z: np.ndarray, solver: Solver, cond: Conditioning,
         cache: FeatureCache | None = None, callback: StepCallback | None = None) -> np.ndarray:
    """Sample (or invert) ``z`` along ``solver.timesteps``; see the module docstring."""
    n = z.shape[0]
    z = np.ascontiguousarray(z, dtype=np.float32)
    cond_text = np.ascontiguousarray(cond.text[n:]) if cond.scale is not None else cond.text
    scale = None if cond.scale is None else cond.scale.reshape((n,) + (1,) * (z.ndim - 1))
    for i, t in enumerate(solver.timesteps):
        guided = cond.guided_at(i)
        rows = np.concatenate([z, z]) if guided else z
        feeds = {"sample": rows, "timestep": np.full((len(rows),), t, dtype=np.int64),
                 "encoder_hidden_states": cond.text if guided else cond_text}
        # the UNet: the whole graph, or with DeepCache its outer blocks on the cached feature
        feature = None if cache is None else cache.feature_for(len(rows))
        if feature is not None:
            out = nets.unet(SHALLOW_NETWORK, {**feeds, "feature": feature}, guided)
        else:
            out = nets.unet("unet" if cache is None else FULL_NETWORK, feeds, guided)
        if cache is not None:
            cache.record(out.get("feature"))
        eps = out["noise_pred"]
        if scale is not None and guided:  # classifier-free guidance
            eps = eps[:n] + scale * (eps[n:] - eps[:n])
        if cond.vgt:  # APLA: the VGT perturbs the predicted noise
            vgt_feeds = {"sample": z, "timestep": np.full((n,), t, dtype=np.int64)}
            if cond.source is not None:
                vgt_feeds["source"] = cond.source
            eps = eps + nets.vgt(vgt_feeds)
        with nets.timings("solver"):
            z = solver.step(eps, int(t), z)
        if callback is not None:
            callback(i, int(t))
    return z
