"""The NumPy DDIM schedule against diffusers, step for step.

diffusers builds its betas and their cumulative product in float32, ours are float64
(as the original latent-diffusion code): the two ``alphas_cumprod`` differ by about 1e-6
relative. The schedule itself is checked against diffusers' at that tolerance; the step
equations are checked at 1e-6 max-abs with diffusers' scheduler carrying our float64
alphas, so that only the equations and timestep bookkeeping are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from apla_rt.errors import ConfigError, InputError
from apla_rt.sampling.schedule import (
    DDIMSchedule,
    SchedulerConfig,
    add_noise,
    alphas_cumprod,
    ddim_inversion_step,
    ddim_step,
    ddim_timesteps,
    final_alpha_cumprod,
    predict_x0,
)

torch.set_num_threads(2)

LATENT = (1, 4, 3, 8, 8)

SD_PNDM_CONFIG = {  # scheduler/scheduler_config.json of an SD 1.x folder
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# diffusers' own DDIMScheduler defaults: linear betas, clipping, alpha_final = 1, offset 0
DIFFUSERS_DEFAULT = SchedulerConfig(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0,
    set_alpha_to_one=True, clip_sample=True)

CONFIGS = {
    "sd1x": SchedulerConfig(),
    "diffusers-default": DIFFUSERS_DEFAULT,
    "sd1x-trailing": SchedulerConfig(timestep_spacing="trailing", steps_offset=0),
}


def diffusers_ddim(cfg: SchedulerConfig, steps: int, float64_alphas: bool) -> DDIMScheduler:
    sched = DDIMScheduler.from_config(cfg.to_dict())
    sched.set_timesteps(steps)
    if float64_alphas:
        sched.alphas_cumprod = torch.from_numpy(alphas_cumprod(cfg))
        sched.final_alpha_cumprod = torch.tensor(final_alpha_cumprod(cfg), dtype=torch.float64)
    return sched


# --- schedule --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_alphas_cumprod_match_diffusers(name):
    cfg = CONFIGS[name]
    ref = DDIMScheduler.from_config(cfg.to_dict())
    ours = alphas_cumprod(cfg)
    assert ours.dtype == np.float64 and ours.shape == (cfg.num_train_timesteps,)
    np.testing.assert_allclose(ours, ref.alphas_cumprod.double().numpy(), rtol=2e-6, atol=0)
    assert final_alpha_cumprod(cfg) == pytest.approx(float(ref.final_alpha_cumprod), rel=2e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333, 999])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers(spacing, steps, offset):
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    ref = DDIMScheduler.from_config(cfg.to_dict())
    ref.set_timesteps(steps)
    ours = ddim_timesteps(cfg, steps)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    assert np.all(np.diff(ours) < 0)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True])
def test_bad_step_count(steps):
    with pytest.raises(InputError):
        ddim_timesteps(SchedulerConfig(), steps)


def test_step_offset_past_last_timestep_is_refused():
    with pytest.raises(InputError, match="use fewer steps"):
        ddim_timesteps(SchedulerConfig(steps_offset=1), 1000)


# --- DDIM step -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [50, 20])
def test_ddim_step_matches_diffusers_step_for_step(name, steps):
    cfg = CONFIGS[name]
    sched = diffusers_ddim(cfg, steps, float64_alphas=True)
    schedule = DDIMSchedule.build(cfg, steps)
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy())
    rng = np.random.default_rng(steps)
    ours = ref = rng.standard_normal(LATENT)
    for t in schedule.timesteps:
        eps = rng.standard_normal(LATENT)
        ref = sched.step(torch.from_numpy(eps), int(t), torch.from_numpy(ref),
                         return_dict=False)[0].numpy()
        ours = ddim_step(eps, t, ours, schedule)
        assert ours.dtype == np.float64
        assert np.abs(ours - ref).max() < 1e-6, f"t={t}"


@pytest.mark.parametrize("steps", [50, 20])
def test_ddim_step_float32_matches_stock_diffusers(steps):
    """Unpatched diffusers, float32 in and out: equal up to float32 alpha rounding."""
    cfg = SchedulerConfig()
    sched = diffusers_ddim(cfg, steps, float64_alphas=False)
    rng = np.random.default_rng(1)
    for t in ddim_timesteps(cfg, steps):
        x = rng.standard_normal(LATENT).astype(np.float32)
        eps = rng.standard_normal(LATENT).astype(np.float32)
        ref = sched.step(torch.from_numpy(eps), int(t), torch.from_numpy(x),
                         return_dict=False)[0].numpy()
        ours = ddim_step(eps, t, x, cfg, steps)
        assert ours.dtype == np.float32 and ours.shape == LATENT
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=3e-6)


def test_step_with_config_equals_step_with_schedule():
    cfg = SchedulerConfig()
    rng = np.random.default_rng(2)
    x, eps = rng.standard_normal((2, *LATENT))
    a = ddim_step(eps, 481, x, cfg, 50)
    b = ddim_step(eps, 481, x, DDIMSchedule.build(cfg, 50))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        ddim_step(eps, 481, x, DDIMSchedule.build(cfg, 50), 20)
    with pytest.raises(ValueError):
        ddim_step(eps, 481, x, cfg)


def test_per_sample_timesteps_broadcast_over_batch():
    cfg = SchedulerConfig()
    schedule = DDIMSchedule.build(cfg, 50)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3, 8, 8))
    eps = rng.standard_normal(x.shape)
    both = ddim_step(eps, np.array([981, 1]), x, schedule)
    np.testing.assert_array_equal(both[0], ddim_step(eps[:1], 981, x[:1], schedule)[0])
    np.testing.assert_array_equal(both[1], ddim_step(eps[1:], 1, x[1:], schedule)[0])


def test_bad_timestep():
    schedule = DDIMSchedule.build(SchedulerConfig(), 50)
    x = np.zeros(LATENT)
    for t in (-1, 1000, 3.5):
        with pytest.raises(ValueError):
            ddim_step(x, t, x, schedule)


# --- inversion -------------------------------------------------------------------------

def tune_a_video_next_step(sched: DDIMScheduler, eps, t, x, steps):
    """Tune-A-Video's ``next_step`` written against diffusers' scheduler, for reference."""
    t_cur, t_next = min(t - sched.config["num_train_timesteps"] // steps, 999), t
    alpha_t = sched.alphas_cumprod[t_cur] if t_cur >= 0 else sched.final_alpha_cumprod
    alpha_next = sched.alphas_cumprod[t_next]
    x0 = (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    return alpha_next ** 0.5 * x0 + (1 - alpha_next) ** 0.5 * eps


def test_inversion_step_matches_tune_a_video():
    cfg = SchedulerConfig()
    sched = diffusers_ddim(cfg, 50, float64_alphas=True)
    schedule = DDIMSchedule.build(cfg, 50)
    rng = np.random.default_rng(4)
    ours = ref = rng.standard_normal(LATENT)
    for t in schedule.timesteps[::-1]:
        eps = rng.standard_normal(LATENT)
        ref = tune_a_video_next_step(
            sched, torch.from_numpy(eps), int(t), torch.from_numpy(ref), 50).numpy()
        ours = ddim_inversion_step(eps, t, ours, schedule)
        assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize("steps", [50, 20])
def test_inversion_then_sampling_reconstructs_with_constant_eps(steps):
    cfg = SchedulerConfig()
    schedule = DDIMSchedule.build(cfg, steps)
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(LATENT).astype(np.float32)
    eps = np.full(LATENT, 0.3, dtype=np.float32)  # the "model": a constant
    x = x0
    for t in schedule.timesteps[::-1]:
        x = ddim_inversion_step(eps, t, x, schedule)
    assert x.dtype == np.float32
    assert np.abs(x - x0).mean() > 0.1  # it did move towards noise
    for t in schedule.timesteps:
        x = ddim_step(eps, t, x, schedule)
    np.testing.assert_allclose(x, x0, atol=1e-4)


# --- forward process -------------------------------------------------------------------

def test_add_noise_matches_diffusers_ddpm():
    cfg = SchedulerConfig()
    ddpm = DDPMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule=cfg.beta_schedule)
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((5, 4, 3, 8, 8))
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 1, 500, 998, 999])
    ref = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    # with diffusers' own (float32) alphas the formula agrees to 1e-6
    same_alphas = add_noise(x0, noise, t, ddpm.alphas_cumprod.double().numpy())
    assert np.abs(same_alphas - ref).max() < 1e-6
    # with our float64 alphas, up to float32 rounding of theirs
    ours = add_noise(x0.astype(np.float32), noise.astype(np.float32), t, alphas_cumprod(cfg))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=3e-6)


def test_predict_x0_inverts_add_noise():
    alphas = alphas_cumprod(SchedulerConfig())
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal((3, 4, 2, 8, 8))
    noise = rng.standard_normal(x0.shape)
    t = np.array([5, 400, 999])
    xt = add_noise(x0, noise, t, alphas)
    np.testing.assert_allclose(predict_x0(xt, noise, t, alphas), x0, atol=1e-9)


# --- config ----------------------------------------------------------------------------

def test_defaults_are_sd1x():
    cfg = SchedulerConfig()
    assert cfg.to_dict() == {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
        "clip_sample": False, "timestep_spacing": "leading", "prediction_type": "epsilon"}


def test_from_dict_sd_pndm_config():
    cfg = SchedulerConfig.from_dict(SD_PNDM_CONFIG)
    assert cfg == SchedulerConfig()
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_diffusers_ddim_config_round_trips():
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    cfg = SchedulerConfig.from_dict(dict(sched.config))
    assert cfg == SchedulerConfig()
    again = DDIMScheduler.from_config(cfg.to_dict())
    for key in cfg.to_dict():
        assert again.config[key] == sched.config[key]
    default = SchedulerConfig.from_dict(dict(DDIMScheduler().config))
    assert default == DIFFUSERS_DEFAULT
    assert SchedulerConfig.from_dict(default.to_dict()) == default


@pytest.mark.parametrize("override", [
    {"thresholding": True},
    {"rescale_betas_zero_snr": True},
    {"trained_betas": [0.1] * 1000},
    {"prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"timestep_spacing": "karras"},
    {"clip_sample": True, "clip_sample_range": 2.0},
    {"num_train_timesteps": "1000"},
    {"set_alpha_to_one": 0},
    {"steps_offset": 1.0},
    {"beta_start": 0.5},
    {"no_such_key": 1},
])
def test_from_dict_refuses_settings_that_change_results(override):
    with pytest.raises(ConfigError):
        SchedulerConfig.from_dict({**dict(DDIMScheduler().config), **override})


def test_from_dict_ignores_irrelevant_keys():
    d = {**SD_PNDM_CONFIG, "variance_type": "fixed_small", "timestep_type": "discrete",
         "thresholding": False, "rescale_betas_zero_snr": False,
         "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0, "clip_sample_range": 7.0}
    assert SchedulerConfig.from_dict(d) == SchedulerConfig()
