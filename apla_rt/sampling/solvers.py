"""Sampling solvers (DDIM, DPM-Solver++ 2M, UniPC-bh2) over one timestep grid, float64 NumPy.

The runtime's loop (``apla_rt.engine.Engine``) and the PyTorch reference sampler
(``apla_train.sampling``) both drive a ``Solver``: one small stateful object per sampling
run, made by ``make_solver``, with ``timesteps`` (int64, descending) and ``step(eps, t, x)``
called once per timestep in that order::

    solver = make_solver("dpmpp-2m", cfg, 20, start_timestep)
    for t in solver.timesteps:
        x = solver.step(model(x, t), int(t), x)

**One grid for every solver** (``sampling_timesteps``): ``steps`` timesteps evenly spaced and
rounded from the start latent's timestep down to ``cfg.steps_offset``; after the last one
the sample lands at ``final_alpha_cumprod`` (abar_0, or 1 with ``set_alpha_to_one``), where
DDIM has always landed. Changing the solver or the step count therefore never moves where
sampling starts or ends. **A start latent knows its timestep**: seeded noise starts at the
schedule's top, T - 1 (``noise_timestep``); a DDIM-inverted latent at the timestep its
inversion ended at (``inverted_timestep``: the top of ``ddim_timesteps`` for the inversion's
step count). Sampled with its inversion's step count, an inverted latent gets exactly the
inversion's timesteps in reverse (the "leading" spacing is even), so DDIM then reproduces
``schedule.ddim_step``'s results. The config's ``timestep_spacing`` governs inversion only.

The solvers, in the notation of the DPM-Solver++ / UniPC papers (alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), x0 = (x - sigma_t eps) / alpha_t):

* ``ddim``: x_prev = alpha_prev x0 + sigma_prev eps, with the grid's actual previous
  timestep (eta = 0; ``clip_sample`` honoured). First order.
* ``dpmpp-2m``: DPM-Solver++ 2M, data prediction, midpoint form, as diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  lower_order_final=True)`` with a first-order final step (diffusers does that for
  ``final_sigmas_type="zero"``, or ``"sigma_min"`` with ``euler_at_final``). Option
  ``karras_sigmas=True``: Karras et al.'s rho = 7 sigma spacing between the same two ends
  (timesteps rounded from the sigmas; the solver uses the sigmas themselves). Second order.
* ``unipc``: UniPC with the B(h) = e^h - 1 variant (bh2), order 2, data prediction, as
  diffusers' ``UniPCMultistepScheduler(solver_order=2, solver_type="bh2",
  lower_order_final=True)``: each step first corrects the previous step's result with the
  model output just computed at it (UniC, no extra model call), then predicts (UniP).
  ``karras_sigmas`` as above.

Inversion is DDIM's (``schedule.ddim_inversion_step``), whatever the sampling solver.

The guidance interval (``guided_steps``): step i of N (i = 0 at the start timestep) runs
classifier-free guidance iff lo <= i / N < hi; the loop runs the others on the conditional
rows only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputError
from .schedule import (DDIMSchedule, SchedulerConfig, alphas_cumprod, ddim_inversion_step,
                       ddim_timesteps, final_alpha_cumprod)

SOLVERS = ("ddim", "dpmpp-2m", "unipc")
KARRAS_RHO = 7.0


def check_solver(name: Any, flag: str = "--scheduler") -> str:
    """``name`` if it is one of ``SOLVERS``, else an ``InputError`` in one line."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise InputError(f"{flag} must be one of {', '.join(SOLVERS)}, got {name!r}")
    return name


def check_guidance_interval(interval: Any, flag: str = "--guidance-interval") -> tuple[float, float]:
    """``(lo, hi)`` with 0 <= lo <= hi <= 1: step i of N is guided iff lo <= i / N < hi."""
    if isinstance(interval, str):
        parts = interval.split(":")
        try:
            interval = tuple(float(p) for p in parts) if len(parts) == 2 else None
        except ValueError:
            interval = None
    ok = (isinstance(interval, (tuple, list)) and len(interval) == 2
          and all(isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
                  and math.isfinite(v) for v in interval)
          and 0.0 <= interval[0] <= interval[1] <= 1.0)
    if not ok:
        raise InputError(f"{flag} must be LO:HI with 0 <= LO <= HI <= 1 (fractions of the "
                         f"schedule), got {interval!r}")
    assert isinstance(interval, (tuple, list))
    return float(interval[0]), float(interval[1])


def guided_steps(steps: int, interval: tuple[float, float] | None) -> np.ndarray:
    """Which of ``steps`` steps run the guidance batch: lo <= i / steps < hi (all for None)."""
    if interval is None:
        return np.ones(steps, dtype=bool)
    lo, hi = interval
    frac = np.arange(steps, dtype=np.float64) / steps
    return (lo <= frac) & (frac < hi)


def noise_timestep(cfg: SchedulerConfig) -> int:
    """Where seeded noise starts: the schedule's top timestep, T - 1."""
    return cfg.num_train_timesteps - 1


def inverted_timestep(cfg: SchedulerConfig, inversion_steps: int) -> int:
    """The timestep a DDIM inversion of ``inversion_steps`` steps ends at (its latent's)."""
    return int(ddim_timesteps(cfg, inversion_steps)[0])


def check_start_timestep(cfg: SchedulerConfig, start_timestep: Any, what: str = "start timestep") -> int:
    lo, hi = cfg.steps_offset, cfg.num_train_timesteps - 1
    if (isinstance(start_timestep, bool) or not isinstance(start_timestep, (int, np.integer))
            or not lo <= start_timestep <= hi):
        raise InputError(f"the {what} must be an integer from {lo} to {hi}, got {start_timestep!r}")
    return int(start_timestep)


def check_steps_fit(cfg: SchedulerConfig, steps: Any, start_timestep: int) -> None:
    """``steps`` timesteps fit on the grid from ``start_timestep`` down to ``cfg.steps_offset``."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"the number of steps must be an integer >= 1, got {steps!r}")
    room = start_timestep - cfg.steps_offset + 1
    if steps > room:
        raise InputError(f"--steps {steps} is more than the {room} timesteps from the start latent's "
                         f"t={start_timestep} down to t={cfg.steps_offset} (the steps do not fit); "
                         "use fewer steps")


def sampling_timesteps(cfg: SchedulerConfig, steps: int, start_timestep: int) -> np.ndarray:
    """The grid: ``steps`` int64 timesteps evenly spaced (rounded), descending, from
    ``start_timestep`` to ``cfg.steps_offset`` (just ``start_timestep`` for one step)."""
    start = check_start_timestep(cfg, start_timestep)
    check_steps_fit(cfg, steps, start)
    end = cfg.steps_offset
    ts = np.array([start], dtype=np.float64) if steps == 1 else np.linspace(start, end, int(steps))
    return np.ascontiguousarray(np.round(ts).astype(np.int64))


def karras_grid(cfg: SchedulerConfig, steps: int, start_timestep: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of Karras et al.'s spacing, sigma = sqrt((1 - abar) / abar) from
    sigma(start) down to sigma(steps_offset) with rho = 7; timesteps are the sigmas mapped
    back through the schedule (log-sigma interpolation) and rounded."""
    sampling_timesteps(cfg, steps, start_timestep)  # the same checks as the even grid
    abar = alphas_cumprod(cfg)
    log_sigmas = 0.5 * np.log((1.0 - abar) / abar)
    s_max, s_min = np.exp(log_sigmas[start_timestep]), np.exp(log_sigmas[cfg.steps_offset])
    ramp = np.linspace(0.0, 1.0, int(steps)) if steps > 1 else np.zeros(1)
    inv_rho = 1.0 / KARRAS_RHO
    sigmas = (s_max ** inv_rho + ramp * (s_min ** inv_rho - s_max ** inv_rho)) ** KARRAS_RHO
    t = np.interp(np.log(sigmas), log_sigmas, np.arange(len(abar), dtype=np.float64))
    return np.ascontiguousarray(np.round(t).astype(np.int64)), sigmas


class Solver:
    """One sampling run: the grid and what a multistep method remembers between steps.

    ``abar`` holds abar at each grid point and, last, at the landing point (N + 1 values);
    subclasses implement ``_update(i, eps, x)`` in float64."""

    name = ""

    def __init__(self, cfg: SchedulerConfig, timesteps: np.ndarray, abar: np.ndarray):
        self.cfg = cfg
        self.timesteps = np.ascontiguousarray(timesteps, dtype=np.int64)
        self.timesteps.setflags(write=False)
        self.abar = np.asarray(abar, dtype=np.float64)
        self.alpha = np.sqrt(self.abar)
        self.sigma = np.sqrt(1.0 - self.abar)
        with np.errstate(divide="ignore"):  # sigma = 0 at the end with set_alpha_to_one
            self.lam = np.log(self.alpha) - np.log(self.sigma)
        self._i = 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def step(self, eps: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        """x at the next grid point (or the landing point) from x at ``t`` and the model's
        noise prediction ``eps`` there; float64 inside, ``x``'s dtype out."""
        i = self._i
        if i >= self.steps or int(t) != int(self.timesteps[i]):
            want = int(self.timesteps[i]) if i < self.steps else "none (the run is over)"
            raise ValueError(f"{self.name} step {i} expects timestep {want}, got {t}")
        x = np.asarray(x)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
        out = self._update(i, np.asarray(eps, dtype=np.float64), x.astype(np.float64))
        self._i += 1
        return out.astype(dtype, copy=False)

    def _x0(self, i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (x - self.sigma[i] * eps) / self.alpha[i]

    def _first_order(self, i: int, x: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """x_{i+1} = (sigma_{i+1} / sigma_i) x - alpha_{i+1} (e^{-h} - 1) x0 (= DDIM), with
        e^{-h} = sigma_{i+1} alpha_i / (alpha_{i+1} sigma_i), finite also at sigma_{i+1} = 0."""
        a_t, s_t, a_s, s_s = self.alpha[i + 1], self.sigma[i + 1], self.alpha[i], self.sigma[i]
        return (s_t / s_s) * x + (a_t - s_t * a_s / s_s) * x0

    def _update(self, i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DDIMSolver(Solver):
    name = "ddim"

    def _update(self, i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        # x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped where the config says so
        x0 = self._x0(i, eps, x)
        if self.cfg.clip_sample:
            x0 = np.clip(x0, -1.0, 1.0)
        # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps (DDIM eq. 12, sigma = 0)
        return self.alpha[i + 1] * x0 + self.sigma[i + 1] * eps


class DPMSolverPP2M(Solver):
    name = "dpmpp-2m"

    def __init__(self, cfg: SchedulerConfig, timesteps: np.ndarray, abar: np.ndarray):
        super().__init__(cfg, timesteps, abar)
        self._prev_x0: np.ndarray | None = None

    def _update(self, i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        x0 = self._x0(i, eps, x)  # the data prediction m_i
        if i == 0 or i == self.steps - 1 or self._prev_x0 is None:
            out = self._first_order(i, x, x0)  # warm-up, and the final step
        else:
            # h = lambda_{i+1} - lambda_i, r = h_{i-1} / h, D1 = (m_i - m_{i-1}) / r
            h = self.lam[i + 1] - self.lam[i]
            r = (self.lam[i] - self.lam[i - 1]) / h
            d1 = (x0 - self._prev_x0) / r
            phi = np.expm1(-h)  # e^{-h} - 1
            a_t = self.alpha[i + 1]
            out = (self.sigma[i + 1] / self.sigma[i]) * x - a_t * phi * x0 - 0.5 * a_t * phi * d1
        self._prev_x0 = x0
        return out


class UniPC(Solver):
    """UniPC-bh2, order 2 (see the module docstring). State: the last two data predictions,
    the sample the last predictor started from and that predictor's order."""

    name = "unipc"

    def __init__(self, cfg: SchedulerConfig, timesteps: np.ndarray, abar: np.ndarray):
        super().__init__(cfg, timesteps, abar)
        self._m: list[np.ndarray] = []  # data predictions m_{i-2}, m_{i-1} (at most two)
        self._last_x: np.ndarray | None = None
        self._last_order = 0

    def _coefficients(self, h: float) -> tuple[float, float, float, float]:
        """(h phi_1, B(h), b_1, b_2) for step size h in lambda, data prediction (hh = -h)."""
        hh = -h
        h_phi_1 = float(np.expm1(hh))
        b_h = h_phi_1  # bh2: B(h) = e^{hh} - 1
        h_phi_k = h_phi_1 / hh - 1.0
        b1 = h_phi_k / b_h
        h_phi_k = h_phi_k / hh - 1.0 / 2.0
        b2 = h_phi_k * 2.0 / b_h
        return h_phi_1, b_h, b1, b2

    def _update(self, i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        m_i = self._x0(i, eps, x)
        if i > 0 and self._last_x is not None:
            x = self._correct(i, m_i)
        order = min(2, self.steps - i, len(self._m) + 1)  # warm-up and lower_order_final
        self._m = (self._m + [m_i])[-2:]
        self._last_x, self._last_order = x, order
        return self._predict(i, x, order)

    def _predict(self, i: int, x: np.ndarray, order: int) -> np.ndarray:
        """UniP: x_{i+1} from x_i and m_i (and m_{i-1} at order 2, rho = 1/2)."""
        m0 = self._m[-1]
        if order == 1:
            return self._first_order(i, x, m0)
        h = self.lam[i + 1] - self.lam[i]
        h_phi_1, b_h, _, _ = self._coefficients(h)
        r = (self.lam[i - 1] - self.lam[i]) / h
        d1 = (self._m[-2] - m0) / r
        a_t = self.alpha[i + 1]
        return (self.sigma[i + 1] / self.sigma[i]) * x - a_t * h_phi_1 * m0 - a_t * b_h * 0.5 * d1

    def _correct(self, i: int, m_t: np.ndarray) -> np.ndarray:
        """UniC: redo the step i-1 -> i with the model output m_t now known at i."""
        assert self._last_x is not None
        order = self._last_order
        m0 = self._m[-1]  # m_{i-1}
        h = self.lam[i] - self.lam[i - 1]
        h_phi_1, b_h, b1, b2 = self._coefficients(h)
        if order == 1:
            corr = 0.5 * (m_t - m0)
        else:
            r = (self.lam[i - 2] - self.lam[i - 1]) / h
            rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([b1, b2]))
            corr = rho[0] * (self._m[-2] - m0) / r + rho[1] * (m_t - m0)
        a_t = self.alpha[i]
        return (self.sigma[i] / self.sigma[i - 1]) * self._last_x - a_t * h_phi_1 * m0 - a_t * b_h * corr


_CLASSES: dict[str, type[Solver]] = {"ddim": DDIMSolver, "dpmpp-2m": DPMSolverPP2M, "unipc": UniPC}
_OPTIONS: dict[str, frozenset[str]] = {"ddim": frozenset(), "dpmpp-2m": frozenset({"karras_sigmas"}),
                                       "unipc": frozenset({"karras_sigmas"})}


def make_solver(name: str, cfg: SchedulerConfig, steps: int, start_timestep: int,
                **options: Any) -> Solver:
    """A fresh ``Solver`` for one sampling run of ``steps`` steps from ``start_timestep``.

    Options: ``karras_sigmas`` (bool, dpmpp-2m and unipc). Errors in the arguments are
    ``InputError``s (one line)."""
    check_solver(name)
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        raise InputError(f"scheduler {name} takes no option(s) {', '.join(unknown)}")
    if name != "ddim" and cfg.clip_sample:
        raise InputError(f"scheduler {name} does not support the run's scheduler.clip_sample; "
                         "use --scheduler ddim")
    final = final_alpha_cumprod(cfg)
    if options.get("karras_sigmas"):
        timesteps, sigmas = karras_grid(cfg, steps, start_timestep)
        abar = 1.0 / (1.0 + sigmas ** 2)
    else:
        timesteps = sampling_timesteps(cfg, steps, start_timestep)
        abar = alphas_cumprod(cfg)[timesteps]
    return _CLASSES[name](cfg, timesteps, np.append(abar, final))


class DDIMInversion:
    """DDIM inversion (Tune-A-Video's) in the ``Solver`` shape: the config's DDIM timesteps
    ascending, ``schedule.ddim_inversion_step`` at each; the result belongs to
    ``inverted_timestep(cfg, steps)``."""

    name = "ddim-inversion"

    def __init__(self, cfg: SchedulerConfig, steps: int):
        self.schedule = DDIMSchedule.build(cfg, steps)
        self.timesteps = self.schedule.timesteps[::-1]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def end_timestep(self) -> int:
        return int(self.timesteps[-1])

    def step(self, eps: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        return ddim_inversion_step(eps, t, x, self.schedule)
