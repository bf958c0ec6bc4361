"""The PyTorch reference sampler: classifier-free guidance plus the VGT, any solver.

    eps_hat = eps_u + s (eps_c - eps_u) + delta,   delta = VGT(z_t, t)

The UNet runs once per step on the guidance batch [uncond, cond]; the VGT once (it does
not see the text). The step itself is an ``apla_rt.sampling.solvers`` solver (float64 NumPy: ddim,
dpmpp-2m, unipc over the one grid), the one source of truth shared with the runtime.
Inversion is DDIM's with the same predictor, the empty prompt and no guidance (spec
section 5).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from apla_rt.sampling.schedule import SchedulerConfig
from apla_rt.sampling.solvers import DDIMInversion, make_solver, noise_timestep

from .components import Codec


def predict_noise_torch(unet, vgt, z: torch.Tensor, t: int, text: torch.Tensor, guidance: float | None,
                        source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eps_hat, eps_theta and delta for latents z (1, c, f, h, w), with the PyTorch modules;
    ``apla_rt.engine.Engine.predict_noise`` is the same step in NumPy over the exported
    networks (the two must agree: tests/test_rt_exported.py).

    ``text`` is (2, seq, d) = [uncond, cond] with guidance, or (1, seq, d) without.
    """
    b = text.shape[0]
    timesteps = torch.full((b,), int(t), dtype=torch.long, device=z.device)
    eps = unet(z.expand(b, *z.shape[1:]), timesteps, text)
    eps_theta = eps[:1] + guidance * (eps[1:] - eps[:1]) if b == 2 else eps
    if vgt is None:
        delta = torch.zeros_like(eps_theta)
    else:
        delta = vgt(z, timesteps[:1], source) if source is not None else vgt(z, timesteps[:1])
    return eps_theta + delta, eps_theta, delta


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


@torch.no_grad()
def ddim_sample(unet, vgt, start: torch.Tensor, text: torch.Tensor, scheduler: SchedulerConfig,
                steps: int, guidance: float, source: torch.Tensor | None = None,
                callback: Callable[[int, int, float], None] | None = None, *,
                solver: str = "ddim", start_timestep: int | None = None,
                solver_options: dict | None = None) -> torch.Tensor:
    """Denoise ``start`` (1, c, f, h, w) from ``start_timestep`` (the latent's: an inverted
    latent's, None for seeded noise's T - 1) to the end of the schedule with ``solver``;
    ``callback(i, t, ratio)`` per step."""
    t0 = noise_timestep(scheduler) if start_timestep is None else start_timestep
    run = make_solver(solver, scheduler, steps, t0, **(solver_options or {}))
    z = start.float()
    for i, t in enumerate(run.timesteps):
        eps_hat, eps_theta, delta = predict_noise_torch(unet, vgt, z, int(t), text, guidance, source)
        if callback is not None:
            ratio = float(delta.norm() / eps_theta.norm().clamp_min(1e-12))
            callback(i, int(t), ratio)
        z = torch.from_numpy(run.step(_np(eps_hat), int(t), _np(z))).to(z.device)
    return z


@torch.no_grad()
def ddim_invert(unet, vgt, latents: torch.Tensor, uncond: torch.Tensor, scheduler: SchedulerConfig,
                steps: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM inversion of clean latents with the empty prompt and no guidance; the result
    belongs to ``apla_rt.sampling.solvers.inverted_timestep(scheduler, steps)``."""
    run = DDIMInversion(scheduler, steps)
    z = latents.float()
    for t in run.timesteps:
        eps_hat, _, _ = predict_noise_torch(unet, vgt, z, int(t), uncond, None, source)
        z = torch.from_numpy(run.step(_np(eps_hat), int(t), _np(z))).to(z.device)
    return z


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (f, h, w, 3) -> float (f, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float (f, 3, h, w) in [-1, 1] -> uint8 (f, h, w, 3)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def encode_video(codec: Codec, frames: np.ndarray, generator: torch.Generator | None = None,
                 chunk: int = 8) -> torch.Tensor:
    """uint8 frames (f, h, w, 3) -> scaled latents (1, c, f, h/8, w/8)."""
    device = next(codec.parameters()).device
    x = frames_to_tensor(frames).to(device)
    z = torch.cat([codec.encode(x[i:i + chunk], generator) for i in range(0, len(x), chunk)])
    return z.permute(1, 0, 2, 3).unsqueeze(0)


@torch.no_grad()
def decode_video(codec: Codec, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """Scaled latents (1, c, f, h, w) -> uint8 frames (f, H, W, 3), decoded in chunks."""
    z = latents[0].permute(1, 0, 2, 3)
    x = torch.cat([codec.decode(z[i:i + chunk].float()) for i in range(0, len(z), chunk)])
    return tensor_to_frames(x)

