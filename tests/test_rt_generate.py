"""``generate`` and ``invert`` on the fake engine folder: decoding in chunks of the VAE's
profile, mp4/gif outputs and seeds, input errors, a latent file, the VGT switched off,
inverted latents written as .npy; the runtime never imports torch; the timings table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rt_fakes import C, LAT, FakeNets, numpy_engine

from apla_rt.errors import InputError
from apla_rt.media.video import images_to_frames
from apla_rt.sampling.timings import Timings
from rt_run import generate, invert
from apla_rt.media.video import read_video

ROOT = Path(__file__).resolve().parents[1]


def test_decode_in_chunks_of_the_vae_profile(fake_engine, monkeypatch):
    import apla_rt.engine as P

    monkeypatch.setattr(P, "DECODE_CHUNK", 2)
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    z = np.random.default_rng(1).standard_normal((1, C, 5, LAT, LAT)).astype(np.float32)
    frames = engine.decode(z)
    assert [c["latent"][0] for c in engine.runners["vae_decoder"].calls] == [2, 2, 1]
    np.testing.assert_array_equal(frames, images_to_frames(nets.vae_decoder(z[0].transpose(1, 0, 2, 3))))


def test_generate_writes_mp4_and_gif(fake_engine, tmp_path):
    for ext in ("mp4", "gif"):
        out = tmp_path / f"v.{ext}"
        result = generate(fake_engine, "a man is skiing", out, steps=2, from_noise=True, frames=3,
                          seed=7)
        assert result.path == out and out.is_file()
        assert read_video(out).shape[0] == 3
    again = generate(fake_engine, "a man is skiing", steps=2, from_noise=True, frames=3, seed=7)
    np.testing.assert_array_equal(again.start, result.start)
    other = generate(fake_engine, "a man is skiing", steps=2, from_noise=True, frames=3, seed=8)
    assert not np.array_equal(other.start, result.start)
    noise = np.random.default_rng(7).standard_normal((1, C, 3, LAT, LAT)).astype(np.float32)
    np.testing.assert_array_equal(result.start, noise)


def test_generate_input_errors(fake_engine, tmp_path):
    with pytest.raises(InputError, match=r"^--frames 40 is outside the engines' range 1\.\.6 \(frames\)$"):
        generate(fake_engine, "x", steps=2, from_noise=True, frames=40)
    with pytest.raises(InputError, match="differs from the 4 frames .* pass --from-noise"):
        generate(fake_engine, "x", steps=2, frames=3)
    with pytest.raises(InputError, match="--steps must be an integer from 1 to 1000"):
        generate(fake_engine, "x", steps=0)
    with pytest.raises(InputError, match="--guidance must be a finite number"):
        generate(fake_engine, "x", steps=1, guidance=float("nan"))
    latent = tmp_path / "z.npy"
    np.save(latent, np.zeros((1, 3, 4, LAT, LAT), np.float32))
    with pytest.raises(InputError, match=r"has shape \[1, 3, 4, 4, 4\]"):
        generate(fake_engine, "x", steps=1, latent=latent)
    with pytest.raises(InputError, match="exclude each other"):
        generate(fake_engine, "x", steps=1, latent=latent, from_noise=True)
    np.save(latent, np.zeros((1, C, 4, LAT + 1, LAT), np.float32))
    with pytest.raises(InputError, match="height = 5 is outside the engines' range 4..4"):
        generate(fake_engine, "x", steps=1, latent=latent)


def test_generate_from_latent_file_and_no_vgt(fake_engine, tmp_path):
    z = np.random.default_rng(3).standard_normal((1, C, 2, LAT, LAT)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    with_vgt = generate(fake_engine, "a man is skiing", steps=3, latent=tmp_path / "z.npy")
    without = generate(fake_engine, "a man is skiing", steps=3, latent=tmp_path / "z.npy", use_vgt=False)
    assert with_vgt.frames.shape[0] == 2 and not without.vgt
    assert not np.allclose(with_vgt.latents, without.latents)
    assert without.timings.calls["vgt"] == 0


def test_invert_writes_npy(fake_engine, tmp_path):
    frames = (np.random.default_rng(0).random((5, 8, 8, 3)) * 255).astype(np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:02d}.png")
    result = invert(folder, fake_engine, tmp_path / "z.npy", steps=3)
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (1, C, 4, LAT, LAT) and np.array_equal(z, result.latent)
    nets = FakeNets(0, vocab=600)
    clean = nets.vae_encoder(frames[:4].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(result.clean[0], clean.transpose(1, 0, 2, 3), atol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        invert(folder, fake_engine, tmp_path / "z.npy", steps=3)


def test_runtime_never_imports_torch(fake_engine, tmp_path):
    """generate through the CLI with torch, apla_train and export made unimportable."""
    out = tmp_path / "v.gif"
    code = (
        "import sys\n"
        "for name in ('torch', 'apla_train', 'export', 'transformers', 'diffusers'):\n"
        "    sys.modules[name] = None\n"
        "from apla_rt.cli import main\n"
        "try:\n"
        f"    main(['generate', '--engine-dir', {str(fake_engine)!r}, '--prompt', 'a man is skiing',"
        f" '--out', {str(out)!r}, '--steps', '2', '--quiet'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'apla_train', 'export')"
        " and sys.modules[m] is not None]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok") and out.is_file()


def test_timings_table():
    t = Timings()
    with t("unet"):
        pass
    with t("unet"):
        pass
    table = t.table()
    assert "unet" in table and "total" in table and t.calls["unet"] == 2
    assert set(t.as_dict()) >= {"text encoder", "unet", "vgt", "solver", "vae", "video write", "total"}


def test_timings_count_each_second_once(fake_engine, monkeypatch):
    """Stages never nest: their sum (``total``) stays within the call's wall time, with loading
    made slow enough that counting it twice would show."""
    import time

    from apla_rt.backends import pool

    real = pool.open_runner

    def slow_open(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "open_runner", slow_open)
    started = time.perf_counter()
    result = generate(fake_engine, "a man is skiing", steps=2, guidance=5.0, threads=1)
    wall = time.perf_counter() - started
    assert result.timings.seconds["load"] >= 0.8  # four networks, 0.2 s each
    assert result.timings.total <= wall
