"""apla_rt end to end on a real run: the session's tiny trained run exported to ONNX once
(``exported`` and ``reference`` in conftest.py) agrees with apla_train's reference sampler,
its VGT contribution is small but nonzero, inverting the training clip gives the run's start
latent, a tampered UNet is refused, and the run's sampling settings are the defaults.

The PyTorch reference sampler (``apla_train.sampling``) steps with the runtime's own solvers
(``apla_rt.sampling.solvers``), so agreeing with it checks the networks and the loop around the solvers,
not the solver arithmetic: tests/test_solvers.py checks that against diffusers' schedulers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from apla_rt.errors import IntegrityError
from apla_rt.backends.placement import serving_graph
from apla_rt.engine import Engine
from apla_rt.folder.manifest import Manifest
from rt_run import generate, invert
from apla_rt.sampling.schedule import DDIMSchedule, ddim_step
from apla_rt.media.video import read_video


@pytest.mark.slow
def test_exported_generate_matches_reference_sampler(exported, reference, tmp_path):
    import torch

    from apla_rt.media.video import psnr
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample, decode_video

    run, engine = exported
    cfg, comp, vgt = reference
    steps, guidance = 4, 12.5
    out = tmp_path / "rt.mp4"
    rt = generate(engine, cfg.prompt, out, steps=steps, guidance=guidance, threads=2)
    start = torch.from_numpy(np.load(run / "start_latent.npy"))
    np.testing.assert_array_equal(rt.start, start.numpy())
    with torch.no_grad():
        text = torch.cat([encode_prompts(comp, [""]), encode_prompts(comp, [cfg.prompt])])
        start_t = json.loads((engine / "manifest.json").read_text())["start_timestep"]
        z = ddim_sample(comp.unet, vgt, start, text, comp.scheduler, steps, guidance,
                        start_timestep=start_t)
        frames = decode_video(comp.codec, z)
    diff = float(np.abs(rt.latents - z.numpy()).max())
    assert diff < 1e-3, diff
    assert psnr(rt.frames, frames) >= 40.0
    assert read_video(out).shape[0] == cfg.data.n_frames
    gif = generate(engine, "a man is skiing at sunset", tmp_path / "noise.gif", steps=2,
                   from_noise=True, frames=3, seed=1)
    assert read_video(gif.path).shape == (3, cfg.data.size, cfg.data.size, 3)


@pytest.mark.slow
def test_exported_vgt_contribution_is_small_but_nonzero(exported):
    _, folder = exported
    with Engine.open(folder, "ort", threads=2) as engine:
        text = engine.encode_text(["", "a man is skiing"])
        z = engine.manifest.load_start_latent()
        schedule = DDIMSchedule.build(engine.manifest.scheduler, 3)
        ratios = []
        for t in schedule.timesteps:
            # the loop's arithmetic (apla_rt.sampling.loop), with its two terms kept apart
            ts = np.full((2,), t, dtype=np.int64)
            eps = engine.pool.unet("unet", {"sample": np.concatenate([z, z]), "timestep": ts,
                                            "encoder_hidden_states": text}, halves=True)["noise_pred"]
            eps_theta = eps[:1] + np.float32(12.5) * (eps[1:] - eps[:1])
            delta = engine.pool.vgt({"sample": z, "timestep": ts[:1]})
            ratios.append(float(np.linalg.norm(delta) / np.linalg.norm(eps_theta)))
            z = ddim_step(eps_theta + delta, int(t), z, schedule)
    assert all(r > 0 for r in ratios), ratios  # trained: the VGT's last layer moved off zero
    assert max(ratios) < 0.3, ratios  # a perturbation, small next to the UNet's prediction
    with_vgt = generate(folder, "a man is skiing", steps=3)
    without = generate(folder, "a man is skiing", steps=3, use_vgt=False)
    assert float(np.abs(with_vgt.latents - without.latents).max()) > 1e-6


@pytest.mark.slow
def test_exported_invert_round_trip(exported):
    """Inverting the training clip gives the run's start latent (same predictor, same steps)."""
    run, folder = exported
    cfg = json.loads((run / "config.json").read_text())
    result = invert(cfg["video"], folder, steps=cfg["sample"]["inversion_steps"], threads=2)
    want = np.load(run / "start_latent.npy")
    assert result.latent.shape == want.shape
    diff = float(np.abs(result.latent - want).max())
    # float32 networks in ONNX Runtime vs PyTorch, no guidance to amplify their difference:
    # measured 1.3e-6 on start latents of magnitude ~3 (the VAE encoder's clean latents agree
    # to 1.5e-6); 1e-4 leaves room for other CPUs' kernels. The generate test above allows
    # 1e-3 because guidance 12.5 multiplies the UNet's difference.
    assert diff < 1e-4, diff


@pytest.mark.slow
def test_exported_tampered_unet_is_refused(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / "engine"
    shutil.copytree(folder, copy)
    # the ONNX Runtime backend loads the fused-attention flavour of the graph that serves the
    # UNet's calls (the feature graph where the folder has it); it is what must be verified
    served = serving_graph(Manifest.open(copy), "unet")
    data = bytearray((copy / f"{served}.ort.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / f"{served}.ort.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{served}\.ort\.onnx does not match its sha256"):
        generate(copy, "a man is skiing", steps=1)


def test_generate_defaults_to_the_runs_sampling_settings(exported):
    """Without --steps/--guidance the runtime samples as the run was configured to (the tiny
    preset's guidance 3 rather than SD's 12.5, which burns a tiny model's video)."""
    _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    defaults = manifest["sample_defaults"]
    result = generate(folder, "a man is skiing")
    assert result.steps == defaults["steps"] and result.guidance == defaults["guidance"]
    explicit = generate(folder, "a man is skiing", steps=1, guidance=7.5)
    assert (explicit.steps, explicit.guidance) == (1, 7.5)
