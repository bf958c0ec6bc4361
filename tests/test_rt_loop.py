"""The runtime's sampling loop (``Engine.sample`` / ``invert_latents``, ``sampling.loop.walk``) on the fake networks'
NumPy twins: against the equations written out in float64 and against the PyTorch reference
sampler of apla_train, with the guidance batch whole or split, and a VGT that reads the
clean source latent.

The PyTorch reference sampler (``apla_train.sampling``) steps with the runtime's own solvers
(``apla_rt.sampling.solvers``), so agreeing with it checks the loop around the solvers, not the solver
arithmetic: here the float64 equations check DDIM's step, and tests/test_solvers.py checks every
solver against diffusers' schedulers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require
from rt_fakes import C, LAT, FakeNets, _tensor, edit_manifest, numpy_engine, settings

from apla_rt import Latent

from apla_rt.errors import InputError
from apla_rt.sampling.schedule import SchedulerConfig, alphas_cumprod
from apla_rt.sampling.solvers import inverted_timestep


def direct_ddim(z, text, steps, guidance, nets, use_vgt=True):
    """The loop from the equations, float64 schedule, no apla_rt.sampling.schedule step functions."""
    cfg = SchedulerConfig()
    abar = alphas_cumprod(cfg)
    ratio = cfg.num_train_timesteps // steps
    z = z.astype(np.float32)
    for t in (np.arange(steps) * ratio)[::-1] + cfg.steps_offset:
        eps = nets.unet(np.concatenate([z, z]), np.array([t, t]), text)
        e = eps[:1] + np.float32(guidance) * (eps[1:] - eps[:1])
        if use_vgt:
            e = e + nets.vgt(z, np.array([t]))
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else abar[0]
        x0 = (z.astype(np.float64) - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        z = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e).astype(np.float32)
    return z


def legacy_top(steps):
    """Where today's DDIM grid of ``steps`` steps starts: an inverted latent of as many steps."""
    return inverted_timestep(SchedulerConfig(), steps)


def test_loop_matches_direct_computation(fake_engine):
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    text = engine.encode_text(["", "a man is skiing"])
    start = engine.manifest.load_start_latent()
    for use_vgt in (True, False):
        got = engine.sample(Latent(start, None, legacy_top(5)), text, settings(5, 7.5), use_vgt=use_vgt)
        want = direct_ddim(start, text, 5, 7.5, nets, use_vgt)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    unet, vgt = engine.runners["unet"], engine.runners["vgt"]
    assert unet.calls[0]["sample"] == (2, C, 4, LAT, LAT) and len(unet.calls) == 10
    assert unet.calls[0]["fed"] == ["sample", "timestep"]  # text given once per loop
    assert not unet.constants  # and taken back after it
    assert vgt.calls[0]["sample"] == (1, C, 4, LAT, LAT) and len(vgt.calls) == 5  # once per step


def test_loop_splits_the_guidance_batch_when_the_profile_says_so(engine_copy):
    edit_manifest(engine_copy, lambda d: d["networks"]["unet"]["profile"].update(batch=[1, 1, 1]))
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(engine_copy, nets)
    text = engine.encode_text(["", "a man is skiing"])
    start = engine.manifest.load_start_latent()
    np.testing.assert_allclose(engine.sample(Latent(start, None, legacy_top(3)), text, settings(3, 4.0)),
                               direct_ddim(start, text, 3, 4.0, nets),
                               rtol=0, atol=1e-5)
    calls = engine.runners["unet"].calls
    assert len(calls) == 6 and all(c["sample"][0] == 1 and "encoder_hidden_states" in c["fed"]
                                   for c in calls)


def test_loop_matches_torch_reference_sampler(fake_engine):
    torch = require("torch")
    from apla_train.sampling import ddim_invert, ddim_sample

    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    text = engine.encode_text(["", "a man is skiing"])
    start = engine.manifest.load_start_latent()

    def unet(z, t, ehs):
        return torch.from_numpy(nets.unet(z.numpy(), t.numpy(), ehs.numpy()))

    def vgt(z, t):
        return torch.from_numpy(nets.vgt(z.numpy(), t.numpy()))

    want = ddim_sample(unet, vgt, torch.from_numpy(start), torch.from_numpy(text),
                       engine.manifest.scheduler, 6, 12.5).numpy()
    np.testing.assert_allclose(engine.sample(Latent(start), text, settings(6, 12.5)), want, rtol=0, atol=1e-5)
    uncond = torch.from_numpy(engine.encode_text([""]))
    want_inv = ddim_invert(unet, vgt, torch.from_numpy(start), uncond, engine.manifest.scheduler, 6).numpy()
    np.testing.assert_allclose(engine.invert_latents(start, 6), want_inv, rtol=0, atol=1e-5)
    assert engine.runners["unet"].calls[-1]["sample"][0] == 1  # inversion: batch 1, no guidance


def test_vgt_with_source_input(engine_copy):
    """A VGT trained with vgt.source gets the clean latent when inverting; generate refuses."""
    def add_source(d):
        vgt = d["networks"]["vgt"]
        vgt["inputs"].append(_tensor("source", "float32", ["batch", C, "frames", LAT, LAT]))
    edit_manifest(engine_copy, add_source)
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(engine_copy, nets)
    seen = []
    engine.runners["vgt"].fn = lambda sample, timestep, source: seen.append(source) or nets.vgt(sample, timestep)
    start = engine.manifest.load_start_latent()
    engine.invert_latents(start, 2)
    assert len(seen) == 2 and all(np.array_equal(s, start) for s in seen)
    text = engine.encode_text(["", "x"])
    with pytest.raises(InputError, match="reads the clean source latent"):
        engine.sample(Latent(start), text, settings(2, 3.0))
    engine.sample(Latent(start), text, settings(2, 3.0), use_vgt=False)
