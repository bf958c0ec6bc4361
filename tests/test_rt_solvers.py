"""The solvers and the guidance interval through the runtime: Engine.sample's loop (UNet rows
counted on the fake networks), Pipeline/CLI/serve settings and their bad values, start
latents that know their timestep (manifest, invert's NAME.json, older folders), and on the
session's exported tiny run: runtime vs the PyTorch reference sampler with a multistep solver
and the reconstruction of the training clip from its inverted latent with every solver.

The PyTorch reference sampler (``apla_train.sampling``) steps with the runtime's own solvers
(``apla_rt.sampling.solvers``), so agreeing with it checks the networks and the loop around the solvers,
not the solver arithmetic: tests/test_solvers.py checks that against diffusers' schedulers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require
from rt_fakes import C, LAT, FakeNets, edit_manifest, numpy_engine, settings

from apla_rt import Latent, Pipeline
from apla_rt.cli import main
from apla_rt.errors import InputError, IntegrityError
from apla_rt.sampling.schedule import SchedulerConfig
from apla_rt.sampling.solvers import SOLVERS, inverted_timestep, noise_timestep

CFG = SchedulerConfig()


def fake(folder):
    engine = numpy_engine(folder, FakeNets(0, vocab=600))
    return engine, engine.encode_text(["", "a man is skiing"]), engine.manifest.load_start_latent()


def test_guidance_interval_runs_the_unet_on_the_cond_rows_outside_it(fake_engine):
    engine, text, start = fake(fake_engine)
    z = engine.sample(Latent(start), text, settings(10, 5.0, "dpmpp-2m", guidance_interval=(0.2, 0.6)))
    rows = [c["sample"][0] for c in engine.runners["unet"].calls]
    assert rows == [1, 1, 2, 2, 2, 2, 1, 1, 1, 1]  # steps 2..5 of 10: 0.2 <= i/10 < 0.6
    assert [c["sample"][0] for c in engine.runners["vgt"].calls] == [1] * 10  # delta every step
    fed = [c["encoder_hidden_states"] for c in engine.runners["unet"].calls]
    assert fed[0][0] == 1 and fed[2][0] == 2
    assert np.isfinite(z).all()
    for name in SOLVERS:
        full, _, _ = fake(fake_engine)
        whole = full.sample(Latent(start), text, settings(6, 5.0, name))
        same = full.sample(Latent(start), text, settings(6, 5.0, name, guidance_interval=(0.0, 1.0)))
        np.testing.assert_array_equal(whole, same)  # the whole schedule: every step guided
        # no step guided: each step takes the conditional prediction, as guidance 1 does
        none = full.sample(Latent(start), text, settings(6, 5.0, name, guidance_interval=(0.5, 0.5)))
        np.testing.assert_allclose(none, full.sample(Latent(start), text, settings(6, 1.0, name)),
                                   rtol=0, atol=1e-5)
        assert not np.allclose(none, whole, atol=1e-3)


def test_pipeline_settings_and_bad_values(engine_copy):
    with Pipeline.open(engine_copy, "ort") as pipe:
        assert pipe.defaults.solver == "ddim"  # a folder that records none
        v, = pipe.generate("a man is skiing", steps=4, scheduler="unipc", guidance_interval=(0, 0.5))
        assert (v.settings.solver, v.settings.guidance_interval) == ("unipc", (0.0, 0.5))
        assert v.start_timestep == inverted_timestep(CFG, 4)  # the run's inversion steps (4)
        noise, = pipe.generate("a man is skiing", steps=3, from_noise=True, seeds=1)
        assert noise.start_timestep == noise_timestep(CFG) == 999
        for kwargs, message in ((dict(scheduler="euler"), "--scheduler must be one of"),
                                (dict(guidance_interval=(0.8, 0.2)), "--guidance-interval must be"),
                                (dict(guidance_interval=(0, 2)), "--guidance-interval must be"),
                                (dict(steps=800), "more than the 751 timesteps")):
            with pytest.raises(InputError, match=message):
                pipe.generate("a man is skiing", **kwargs)
        given, = pipe.generate("a man is skiing", steps=2, latent=Latent(v.start, timestep=333))
        assert given.start_timestep == 333
    edit_manifest(engine_copy, lambda d: d["sample_defaults"].update(scheduler="dpmpp-2m"))
    with Pipeline.open(engine_copy, "ort") as pipe:
        assert pipe.generate("a man is skiing", steps=2)[0].settings.solver == "dpmpp-2m"
        assert pipe.summary()["scheduler"] == "dpmpp-2m"
    edit_manifest(engine_copy, lambda d: d.update(start_timestep=500))
    with Pipeline.open(engine_copy, "ort") as pipe:
        assert pipe.generate("a man is skiing", steps=2)[0].start_timestep == 500
    edit_manifest(engine_copy, lambda d: d.update(start_timestep=1000))
    with pytest.raises(IntegrityError, match="start_timestep must be an integer"):
        Pipeline.open(engine_copy, "ort")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_cli_scheduler_guidance_interval_and_invert_timestep(engine_copy, tmp_path):
    base = ("generate", "--engine-dir", engine_copy, "--prompt", "a man is skiing", "--steps", "3",
            "--quiet")
    ok = run_cli(*base, "--out", tmp_path / "a.gif", "--scheduler", "dpmpp-2m",
                 "--guidance-interval", "0.2:0.8")
    assert ok.exit_code == 0, ok.output
    one_line_error(run_cli(*base, "--out", tmp_path / "b.gif", "--scheduler", "euler"),
                   "--scheduler must be one of ddim, dpmpp-2m, unipc, got 'euler'")
    for bad in ("0.8:0.2", "half", "0:1:2", "-1:0.5"):
        one_line_error(run_cli(*base, "--out", tmp_path / "b.gif", "--guidance-interval", bad),
                       "--guidance-interval must be LO:HI")
    assert not (tmp_path / "b.gif").exists()
    info = run_cli("info", "--engine-dir", engine_copy)
    assert "sampling: ddim by default" in info.output and "t=751 (not recorded" in info.output

    from apla_rt.media.video import write_video

    clip = tmp_path / "clip.gif"
    write_video(clip, (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8))
    out = tmp_path / "z.npy"
    assert run_cli("invert", clip, "--engine-dir", engine_copy, "--out", out, "--steps", "3",
                   "--quiet").exit_code == 0
    stamp = json.loads((tmp_path / "z.json").read_text())
    assert stamp == {"timestep": inverted_timestep(CFG, 3), "inversion_steps": 3}
    with Pipeline.open(engine_copy, "ort") as pipe:
        assert pipe.generate("a man", steps=3, latent=out)[0].start_timestep == 667
        (tmp_path / "z.json").write_text('{"timestep": 5000}')
        with pytest.raises(InputError, match="timestep in .*z.json must be an integer"):
            pipe.generate("a man", steps=3, latent=out)
        (tmp_path / "z.json").unlink()  # a latent from before: the run's inversion steps (4)
        assert pipe.generate("a man", steps=3, latent=out)[0].start_timestep == 751
        inverted = pipe.invert(clip, steps=5)
        assert inverted.timestep == inverted_timestep(CFG, 5)


def test_serve_request_fields(fake_engine):
    require("ray")
    from apla_rt.service.serve import parse_generate

    with Pipeline.open(fake_engine, "ort") as pipe:
        request, _ = parse_generate(json.dumps({"prompt": "a man", "scheduler": "unipc",
                                                "guidance_interval": [0.1, 0.9]}).encode(), pipe, False)
        assert (request.settings.solver, request.settings.guidance_interval) == ("unipc", (0.1, 0.9))
        request, _ = parse_generate(b'{"prompt": "a man", "guidance_interval": "0:0.5"}', pipe, False)
        assert request.settings.guidance_interval == (0.0, 0.5)
        for body, message in (({"scheduler": "plms"}, "--scheduler must be one of"),
                              ({"scheduler": 3}, "--scheduler must be text"),
                              ({"guidance_interval": [0.5]}, "--guidance-interval must be"),
                              ({"guidance_interval": [0.5, True]}, "--guidance-interval must be")):
            with pytest.raises(InputError, match=message) as err:
                parse_generate(json.dumps({"prompt": "a man", **body}).encode(), pipe, False)
            assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the tiny run


@pytest.mark.slow
def test_exported_multistep_solver_matches_reference_sampler(exported, reference):
    import torch

    from rt_run import generate
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample

    run, engine = exported
    cfg, comp, vgt = reference
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["start_timestep"] == inverted_timestep(comp.scheduler, cfg.sample.inversion_steps)
    assert manifest["sample_defaults"]["scheduler"] == cfg.sample.scheduler == "ddim"
    start = torch.from_numpy(np.load(run / "start_latent.npy"))
    with torch.no_grad():
        text = torch.cat([encode_prompts(comp, [""]), encode_prompts(comp, [cfg.prompt])])
        for name in ("dpmpp-2m", "unipc"):
            rt = generate(engine, cfg.prompt, steps=5, guidance=7.5, scheduler=name, threads=2)
            z = ddim_sample(comp.unet, vgt, start, text, comp.scheduler, 5, 7.5, solver=name,
                            start_timestep=manifest["start_timestep"])
            diff = float(np.abs(rt.latents - z.numpy()).max())
            assert diff < 1e-3, (name, diff)


@pytest.mark.slow
def test_every_solver_reconstructs_the_training_clip(exported):
    """From the DDIM-inverted latent with the training prompt and the run's guidance. Measured
    on the session's run (6 training steps, 2 inversion steps, 32 px): 19.8 dB for every
    solver at 2 steps, 21.3-21.7 dB at 5 and 10."""
    from rt_run import generate
    from apla_rt.media.video import psnr, read_video

    run, engine = exported
    cfg = json.loads((run / "config.json").read_text())
    clip = read_video(cfg["video"], start=cfg["data"]["start"], stride=cfg["data"]["stride"],
                      n_frames=cfg["data"]["n_frames"], size=cfg["data"]["size"])
    figures = {}
    for name in SOLVERS:
        for steps in (2, 5, 10):
            video = generate(engine, cfg["prompt"], steps=steps, scheduler=name, threads=2)
            figures[name, steps] = psnr(video.frames, clip)
    print("reconstruction PSNR (dB):", {f"{n}@{s}": round(v, 2) for (n, s), v in figures.items()})
    base = figures["ddim", 2]  # DDIM with the inversion's own steps: today's reconstruction
    assert base > 17.0, figures
    assert all(v > base - 1.0 for v in figures.values()), figures
