"""apla_rt.sampling.solvers against diffusers' schedulers (same model outputs, same timesteps) and
against the closed-form probability-flow ODE of Gaussian data; the one grid rule."""

from __future__ import annotations

import numpy as np
import pytest

from apla_rt.errors import InputError
from apla_rt.sampling.schedule import (DDIMSchedule, SchedulerConfig, alphas_cumprod, ddim_step,
                              final_alpha_cumprod)
from apla_rt.sampling.solvers import (SOLVERS, inverted_timestep, make_solver, noise_timestep,
                             sampling_timesteps)

STEPS = (5, 10, 20, 25, 50)
SHAPE = (2, 4, 3, 5, 5)
DIFFUSERS_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")


def fake_eps(x, t):
    """A deterministic, nonlinear stand-in for the UNet."""
    return 0.8 * np.tanh(0.7 * x + 0.001 * t) + 0.3 * np.sin(1.3 * x + 0.002 * t)


def start_noise():
    return np.random.default_rng(0).standard_normal(SHAPE)


def run_ours(solver):
    x = start_noise()
    for t in solver.timesteps:
        x = solver.step(fake_eps(x, int(t)), int(t), x)
    return x


def run_diffusers(scheduler, timesteps):
    import torch

    x = torch.from_numpy(start_noise())
    for t in timesteps:
        x = scheduler.step(torch.from_numpy(fake_eps(x.numpy(), int(t))), int(t), x).prev_sample
    return x.numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def diffusers_twin(name, solver, set_alpha_to_one, karras=False):
    """diffusers' scheduler for ``name``, set up to walk ``solver``'s grid and land where it
    lands (sigma 0, or sigma(t=0) with a first-order last step)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    final = "zero" if set_alpha_to_one else "sigma_min"
    if name == "dpmpp-2m":
        sched = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, algorithm_type="dpmsolver++",
                                            solver_order=2, lower_order_final=True,
                                            final_sigmas_type=final, euler_at_final=True,
                                            use_karras_sigmas=karras)
        if karras:
            sched.set_timesteps(solver.steps)
            assert np.array_equal(sched.timesteps.numpy(), solver.timesteps)
        else:
            sched.set_timesteps(timesteps=solver.timesteps.tolist())
        return sched
    sched = UniPCMultistepScheduler(**DIFFUSERS_SCHEDULE, solver_order=2, solver_type="bh2",
                                    lower_order_final=True, final_sigmas_type=final)
    sched.set_timesteps(solver.steps)  # then the grid is replaced by ours: timesteps and sigmas
    sched.timesteps = torch.from_numpy(solver.timesteps.copy())
    sched.sigmas = torch.from_numpy((solver.sigma / solver.alpha).astype(np.float32))
    return sched


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc"])
def test_multistep_solvers_match_diffusers(name, set_alpha_to_one):
    cfg = SchedulerConfig(set_alpha_to_one=set_alpha_to_one)
    for steps in STEPS:
        solver = make_solver(name, cfg, steps, noise_timestep(cfg))
        ours = run_ours(solver)
        theirs = run_diffusers(diffusers_twin(name, solver, set_alpha_to_one), solver.timesteps)
        assert rel(ours, theirs) < 1e-6, (steps, rel(ours, theirs))


def test_karras_sigmas_match_diffusers():
    cfg = SchedulerConfig(set_alpha_to_one=True, steps_offset=0)  # diffusers' Karras ends at t=0
    for steps in (10, 25):
        for name in ("dpmpp-2m",):
            solver = make_solver(name, cfg, steps, noise_timestep(cfg), karras_sigmas=True)
            theirs = run_diffusers(diffusers_twin(name, solver, True, karras=True), solver.timesteps)
            assert rel(run_ours(solver), theirs) < 1e-6


def test_ddim_matches_diffusers_and_todays_step():
    """DDIM step by step on the project's grid: against diffusers' DDIMScheduler where its
    grid is ours (an inverted latent sampled with its inversion's step count), against the
    first-order DPM-Solver++ (DDIM in other words) on the grid from T - 1, and exactly
    today's ``schedule.ddim_step`` on the inverted latent's grid."""
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = SchedulerConfig()
    for steps in STEPS:
        solver = make_solver("ddim", cfg, steps, inverted_timestep(cfg, steps))
        legacy = DDIMSchedule.build(cfg, steps)
        assert np.array_equal(solver.timesteps, legacy.timesteps)
        ours = run_ours(solver)
        ddim = DDIMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1)
        ddim.set_timesteps(steps)
        assert np.array_equal(ddim.timesteps.numpy(), solver.timesteps)
        x = torch.from_numpy(start_noise())
        today = start_noise()
        for t in solver.timesteps:
            x = ddim.step(torch.from_numpy(fake_eps(x.numpy(), int(t))), int(t), x).prev_sample
            today = ddim_step(fake_eps(today, int(t)), int(t), today, legacy)
        assert rel(ours, x.numpy()) < 1e-6
        np.testing.assert_allclose(ours, today, rtol=1e-12, atol=1e-12)

        from_top = make_solver("ddim", cfg, steps, noise_timestep(cfg))
        first_order = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, solver_order=1,
                                                  final_sigmas_type="sigma_min")
        first_order.set_timesteps(timesteps=from_top.timesteps.tolist())
        assert rel(run_ours(from_top), run_diffusers(first_order, from_top.timesteps)) < 1e-6


# --------------------------------------------------------------------------- order


MU, STD = 0.3, 0.5  # the Gaussian data: x0 ~ N(MU, STD^2) per element


def gaussian_eps(abar):
    """The exact noise prediction of Gaussian data: E[eps | x_t], linear in x_t."""
    def eps(x, t):
        a = abar[t]
        return np.sqrt(1 - a) * (x - np.sqrt(a) * MU) / (a * STD ** 2 + 1 - a)
    return eps


def ode_solution(x, a0, a1):
    """The probability-flow ODE keeps x's standardised value: from abar a0 to abar a1."""
    return (np.sqrt(a1) * MU + np.sqrt(a1 * STD ** 2 + 1 - a1)
            * (x - np.sqrt(a0) * MU) / np.sqrt(a0 * STD ** 2 + 1 - a0))


def order_of(name, step_counts, **options):
    cfg = SchedulerConfig()
    abar = alphas_cumprod(cfg)
    eps = gaussian_eps(abar)
    x0 = np.random.default_rng(1).standard_normal(2000)
    start = noise_timestep(cfg)
    want = ode_solution(x0, abar[start], final_alpha_cumprod(cfg))
    errors = []
    for steps in step_counts:
        solver = make_solver(name, cfg, steps, start, **options)
        x = x0.copy()
        for t in solver.timesteps:
            x = solver.step(eps(x, int(t)), int(t), x)
        errors.append(float(np.sqrt(np.mean((x - want) ** 2))))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    return -float(np.polyfit(np.log(step_counts), np.log(errors), 1)[0]), errors


def test_error_falls_at_each_solvers_order():
    """DDIM is first order, DPM-Solver++ 2M second. On the even-in-t grid the multistep
    solvers reach their order from about 100 steps (the grid's last steps are long in
    lambda); on Karras sigmas already from 10."""
    ddim, _ = order_of("ddim", [100, 200, 400])
    dpm, _ = order_of("dpmpp-2m", [100, 200, 400])
    karras, _ = order_of("dpmpp-2m", [10, 20, 40], karras_sigmas=True)
    unipc, _ = order_of("unipc", [100, 200, 400])
    assert 0.8 < ddim < 1.2, ddim
    assert 1.7 < dpm < 2.4, dpm
    assert 1.7 < karras < 2.4, karras
    assert unipc > 1.8, unipc


# --------------------------------------------------------------------------- the grid


def test_one_grid_for_every_solver():
    cfg = SchedulerConfig()
    for start in (999, 961, 501):
        for steps in (1, 2, 7, 25, 50):
            grids = [make_solver(n, cfg, steps, start).timesteps for n in SOLVERS]
            assert all(np.array_equal(g, grids[0]) for g in grids)
            g = grids[0]
            assert g[0] == start and (steps == 1 or g[-1] == cfg.steps_offset)
            assert np.all(np.diff(g) < 0) and g.dtype == np.int64
            np.testing.assert_allclose(g, np.linspace(start, cfg.steps_offset, steps) if steps > 1
                                       else [start], atol=0.5)
    # today's `--steps 50` on a 25-step inversion started at 981 from a latent of t=961
    assert sampling_timesteps(cfg, 50, inverted_timestep(cfg, 25))[0] == 961


def test_solver_refuses_bad_arguments():
    cfg = SchedulerConfig()
    with pytest.raises(InputError, match="must be one of ddim, dpmpp-2m, unipc"):
        make_solver("euler", cfg, 10, 999)
    with pytest.raises(InputError, match="do not fit"):
        make_solver("ddim", cfg, 30, 20)
    with pytest.raises(InputError, match="start timestep"):
        make_solver("unipc", cfg, 10, 1000)
    with pytest.raises(InputError, match="takes no option"):
        make_solver("ddim", cfg, 10, 999, karras_sigmas=True)
    with pytest.raises(InputError, match="clip_sample"):
        make_solver("dpmpp-2m", SchedulerConfig(clip_sample=True), 10, 999)
    solver = make_solver("dpmpp-2m", cfg, 3, 999)
    x = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="expects timestep 999"):
        solver.step(x, 500, x)
    assert solver.step(x, 999, x).dtype == np.float32
