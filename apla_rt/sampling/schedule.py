"""DDIM noise schedule and steps as float64 NumPy pure functions.

This module is the single source of truth for the schedule: training, the PyTorch
reference sampler and the runtime all import it. It follows diffusers' ``DDIMScheduler``
(eta = 0, epsilon prediction) step for step; the schedule is computed in float64 as in
the original latent-diffusion code (diffusers builds it in float32: its ``alphas_cumprod``
differs from ours by about 1e-6 relative).

Usage (sampling; the loop is written out by the caller)::

    schedule = DDIMSchedule.build(cfg, 50)
    for t in schedule.timesteps:
        eps = model(x, t)
        x = ddim_step(eps, t, x, schedule)

DDIM inversion (Tune-A-Video) walks the same timesteps in ascending order, calling the
model at ``t`` on the current latent and then ``ddim_inversion_step``::

    for t in schedule.timesteps[::-1]:
        eps = model(x, t)
        x = ddim_inversion_step(eps, t, x, schedule)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, InputError

BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers scheduler_config.json keys that do not change a DDIM (eta = 0, epsilon)
# result: they belong to other schedulers (PNDM, DDPM, Euler, DPM-Solver, ...) or only
# matter when a setting we refuse is switched on (thresholding).
IGNORED_KEYS = frozenset({
    "skip_prk_steps",             # PNDM
    "variance_type",              # DDPM (eta = 0 has no variance)
    "dynamic_thresholding_ratio",  # only with thresholding=True (refused)
    "sample_max_value",           # only with thresholding=True (refused)
    "timestep_type",              # Euler
    "interpolation_type",         # Euler
    "use_karras_sigmas",          # Euler / DPM-Solver sigma spacing
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "final_sigmas_type",
    "solver_order",               # DPM-Solver / UniPC
    "solver_type",
    "algorithm_type",
    "lower_order_final",
    "euler_at_final",
    "lambda_min_clipped",
    "use_lu_lambdas",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "clip_sample_range",          # checked below: must be 1.0 when clip_sample is on
})

# Keys whose only supported value is the one given; anything else would change results.
REQUIRED_VALUES: Mapping[str, Any] = {
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """DDIM settings; the defaults are Stable Diffusion 1.x's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                ok = True
            if not ok:
                raise ConfigError(
                    f"scheduler.{f.name} must be {f.type}, got {value!r}")
        if self.num_train_timesteps < 2:
            raise ConfigError("scheduler.num_train_timesteps must be at least 2")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(
                "scheduler betas must satisfy 0 < beta_start < beta_end < 1, got "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"scheduler.beta_schedule {self.beta_schedule!r} is not supported; "
                f"use one of {', '.join(BETA_SCHEDULES)}")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ConfigError("scheduler.steps_offset must be in [0, num_train_timesteps)")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(
                f"scheduler.timestep_spacing {self.timestep_spacing!r} is not supported; "
                f"use one of {', '.join(TIMESTEP_SPACINGS)}")
        if self.prediction_type != "epsilon":
            raise ConfigError(
                f"scheduler.prediction_type {self.prediction_type!r} is not supported; "
                "only 'epsilon' models can be sampled")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        """Build from our own ``to_dict`` or a diffusers ``scheduler_config.json`` dict.

        Keys starting with ``_`` and those in ``IGNORED_KEYS`` are dropped; the keys in
        ``REQUIRED_VALUES`` must hold their supported value; any other unknown key is an
        error.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key.startswith("_") or key in IGNORED_KEYS:
                continue
            if key in REQUIRED_VALUES:
                if value != REQUIRED_VALUES[key] or type(value) is not type(REQUIRED_VALUES[key]):
                    raise ConfigError(
                        f"scheduler setting {key}={value!r} is not supported "
                        f"(only {REQUIRED_VALUES[key]!r}); remove it from the scheduler config")
                continue
            if key not in names:
                raise ConfigError(
                    f"unknown scheduler setting {key!r}; known: {', '.join(sorted(names))}")
            kwargs[key] = value
        if d.get("clip_sample") and float(d.get("clip_sample_range", 1.0)) != 1.0:
            raise ConfigError(
                "scheduler clip_sample_range other than 1.0 is not supported; "
                "set clip_sample_range to 1.0 or clip_sample to false")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def betas(cfg: SchedulerConfig) -> np.ndarray:
    """Per-step noise variances beta_t, float64 (T,)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    # "scaled_linear": linear in sqrt(beta), the latent-diffusion schedule
    return np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s), float64 (T,)."""
    return np.cumprod(1.0 - betas(cfg))


def final_alpha_cumprod(cfg: SchedulerConfig) -> float:
    """abar used for the step past t = 0: 1.0 or abar_0 (``set_alpha_to_one``)."""
    return 1.0 if cfg.set_alpha_to_one else float(alphas_cumprod(cfg)[0])


def ddim_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """Descending int64 timesteps, as diffusers' ``DDIMScheduler.set_timesteps``."""
    n_train = cfg.num_train_timesteps
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= n_train:
        raise InputError(f"number of DDIM steps must be an integer in [1, {n_train}], got {n!r}")
    n = int(n)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = n_train // n
        ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    else:  # "trailing"
        ts = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
    if ts.max() >= n_train:
        raise InputError(
            f"{n} DDIM steps with steps_offset {cfg.steps_offset} reach timestep {ts.max()} "
            f">= {n_train}; use fewer steps")
    return np.ascontiguousarray(ts)


@dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """The schedule for one (config, number of steps): build once, pass to every step."""

    cfg: SchedulerConfig
    num_inference_steps: int
    alphas_cumprod: np.ndarray   # float64 (T,)
    final_alpha_cumprod: float
    timesteps: np.ndarray        # int64 (num_inference_steps,), descending

    @classmethod
    def build(cls, cfg: SchedulerConfig, num_inference_steps: int) -> "DDIMSchedule":
        timesteps = ddim_timesteps(cfg, num_inference_steps)
        abar = alphas_cumprod(cfg)
        abar.setflags(write=False)
        timesteps.setflags(write=False)
        final = 1.0 if cfg.set_alpha_to_one else float(abar[0])
        return cls(cfg, int(num_inference_steps), abar, final, timesteps)

    @property
    def step_ratio(self) -> int:
        """Distance between consecutive timesteps as diffusers' ``step`` assumes it."""
        return self.cfg.num_train_timesteps // self.num_inference_steps

    def alpha_at(self, t: np.ndarray) -> np.ndarray:
        """abar_t, with ``final_alpha_cumprod`` for t < 0."""
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)], self.final_alpha_cumprod)


def _schedule(cfg: SchedulerConfig | DDIMSchedule, num_inference_steps: int | None) -> DDIMSchedule:
    if isinstance(cfg, DDIMSchedule):
        if num_inference_steps is not None and num_inference_steps != cfg.num_inference_steps:
            raise ValueError(
                f"schedule was built for {cfg.num_inference_steps} steps, "
                f"got num_inference_steps={num_inference_steps}")
        return cfg
    if num_inference_steps is None:
        raise ValueError("num_inference_steps is required with a SchedulerConfig")
    return DDIMSchedule.build(cfg, num_inference_steps)


def _timestep(timestep: Any, n_train: int, ndim: int) -> np.ndarray:
    """An int64 scalar or (b,) array of timesteps, shaped to broadcast over (b, ...)."""
    t = np.asarray(timestep)
    if not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.equal(np.mod(t, 1), 0)):
            raise ValueError(f"timesteps must be integers, got {timestep!r}")
    t = t.astype(np.int64)
    if t.ndim > 1:
        raise ValueError(f"timestep must be a scalar or a (b,) array, got shape {t.shape}")
    if np.any(t < 0) or np.any(t >= n_train):
        raise ValueError(f"timesteps must be in [0, {n_train}), got {timestep!r}")
    return t.reshape(t.shape + (1,) * (ndim - t.ndim)) if t.ndim == 1 else t


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _out_dtype(x: np.ndarray) -> np.dtype:
    x = np.asarray(x)
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)


def predict_x0(sample: np.ndarray, eps: np.ndarray, timestep: Any,
               alphas: np.ndarray) -> np.ndarray:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); ``alphas`` is abar (T,)."""
    sample = np.asarray(sample)
    t = _timestep(timestep, len(alphas), sample.ndim)
    abar = _f64(alphas)[t]
    x0 = (_f64(sample) - np.sqrt(1.0 - abar) * _f64(eps)) / np.sqrt(abar)
    return x0.astype(_out_dtype(sample), copy=False)


def add_noise(x0: np.ndarray, noise: np.ndarray, timesteps: Any, alphas: np.ndarray) -> np.ndarray:
    """DDPM forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    ``x0`` has shape (b, ...); ``timesteps`` is a scalar or (b,) and broadcasts over the
    leading batch dim. ``alphas`` is abar (T,). Returns ``x0``'s dtype.
    """
    x0 = np.asarray(x0)
    t = _timestep(timesteps, len(alphas), x0.ndim)
    abar = _f64(alphas)[t]
    xt = np.sqrt(abar) * _f64(x0) + np.sqrt(1.0 - abar) * _f64(noise)
    return xt.astype(_out_dtype(x0), copy=False)


def ddim_step(model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              cfg: SchedulerConfig | DDIMSchedule,
              num_inference_steps: int | None = None) -> np.ndarray:
    """One deterministic DDIM step (eta = 0): x_t -> x_{t - T // n}.

    ``cfg`` is a ``SchedulerConfig`` (then ``num_inference_steps`` is required) or a
    prebuilt ``DDIMSchedule``. Any shape; ``timestep`` is a scalar or (b,) for a (b, ...)
    sample. Computes in float64 and returns ``sample``'s dtype. Equation numbers refer
    to the DDIM paper (Song et al. 2020).
    """
    sch = _schedule(cfg, num_inference_steps)
    sample = np.asarray(sample)
    x = _f64(sample)
    eps = _f64(model_output)
    t = _timestep(timestep, sch.cfg.num_train_timesteps, x.ndim)

    # 1. previous timestep (diffusers assumes evenly spaced steps)
    t_prev = t - sch.step_ratio

    # 2. abar_t and abar_{t-1} (final_alpha_cumprod past t = 0)
    alpha_t = sch.alphas_cumprod[t]
    alpha_prev = sch.alpha_at(t_prev)
    beta_t = 1.0 - alpha_t

    # 3. predicted x0, eq. (12): x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x0 = (x - np.sqrt(beta_t) * eps) / np.sqrt(alpha_t)

    # 4. optional clipping of x0 to [-1, 1]
    if sch.cfg.clip_sample:
        x0 = np.clip(x0, -1.0, 1.0)

    # 5. direction pointing to x_t, eq. (12) with sigma_t = 0: sqrt(1 - abar_{t-1}) eps
    direction = np.sqrt(1.0 - alpha_prev) * eps

    # 6. x_{t-1} = sqrt(abar_{t-1}) x0 + direction, eq. (12)
    prev = np.sqrt(alpha_prev) * x0 + direction
    return prev.astype(_out_dtype(sample), copy=False)


def ddim_inversion_step(model_output: np.ndarray, timestep: Any, sample: np.ndarray,
                        cfg: SchedulerConfig | DDIMSchedule,
                        num_inference_steps: int | None = None) -> np.ndarray:
    """One DDIM inversion step (Tune-A-Video's ``next_step``): x_{t - T//n} -> x_t.

    The inversion loop walks ``ddim_timesteps`` in ascending order; at each ``t`` it calls
    the model on the current (less noisy) latent at timestep ``t`` and then this step,
    which moves that latent from ``t_cur = min(t - T // n, T - 1)`` up to ``t_next = t``.
    Computes in float64 and returns ``sample``'s dtype.
    """
    sch = _schedule(cfg, num_inference_steps)
    sample = np.asarray(sample)
    x = _f64(sample)
    eps = _f64(model_output)
    n_train = sch.cfg.num_train_timesteps
    t_next = _timestep(timestep, n_train, x.ndim)

    # 1. the timestep we are coming from
    t_cur = np.minimum(t_next - sch.step_ratio, n_train - 1)

    # 2. abar at both ends (final_alpha_cumprod below t = 0)
    alpha_t = sch.alpha_at(t_cur)
    alpha_next = sch.alphas_cumprod[t_next]

    # 3. predicted x0 from the current latent
    x0 = (x - np.sqrt(1.0 - alpha_t) * eps) / np.sqrt(alpha_t)

    # 4. re-noise deterministically to t_next with the same eps
    nxt = np.sqrt(alpha_next) * x0 + np.sqrt(1.0 - alpha_next) * eps
    return nxt.astype(_out_dtype(sample), copy=False)
