"""The Python API (``apla_rt.Pipeline``) and batched ``apla-rt generate``: a batch of videos
equals each video generated alone (the fake engine's twins, and the session's exported tiny
run), batches respect the engines' profile, prompts pair with seeds, the CLI writes a folder
with ``index.json``, and a ``vgt.source`` model edits a new clip with that clip's clean
latent (``invert`` keeps it, ``generate --latent`` reads it)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from rt_fakes import C, LAT, FakeNets, _tensor, edit_manifest, numpy_engine, rehash

from apla_rt import Latent, Pipeline, Request
from apla_rt.cli import main
from apla_rt.errors import InputError, OutputExistsError
from apla_rt.media.video import read_video

PROMPTS = ["a man is skiing", "the man is skiing", "a man"]


def test_batch_equals_one_at_a_time_on_the_fake_engine(fake_engine):
    with Pipeline.open(fake_engine, "ort", max_batch=3) as pipe:
        batch = pipe.generate(PROMPTS, seeds=[1, 2, 3], from_noise=True, steps=3, guidance=4.0)
        alone = [pipe.generate(p, seeds=s, from_noise=True, steps=3, guidance=4.0)[0]
                 for p, s in zip(PROMPTS, [1, 2, 3])]
    assert [v.batch_size for v in batch] == [3, 3, 3] and alone[0].batch_size == 1
    for b, a in zip(batch, alone):
        np.testing.assert_allclose(b.latents, a.latents, rtol=0, atol=1e-5)
        assert (b.prompt, b.seed) == (a.prompt, a.seed)
    assert not np.allclose(batch[0].latents, batch[1].latents)


def test_batches_are_chunked_to_the_profile(fake_engine):
    """The fake UNet takes batch <= 2 (one guided video): a batch of 3 videos runs the UNet in
    calls of 2 rows and the VGT in calls of 2, and still equals the loop written out."""
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    pipe = Pipeline(engine, max_batch=3)
    assert Pipeline(numpy_engine(fake_engine, nets)).max_batch == 1  # the profile's default
    videos = pipe.run([Request(p, s, steps=2, guidance=3.0) for p, s in zip(PROMPTS, [5, 6, 7])],
                      from_noise=True)
    unet, vgt = engine.runners["unet"], engine.runners["vgt"]
    assert {c["sample"][0] for c in unet.calls} == {2} and len(unet.calls) == 2 * 3
    assert [c["sample"][0] for c in vgt.calls] == [2, 1, 2, 1]
    single = Pipeline(numpy_engine(fake_engine, nets))
    for v in videos:
        want, = single.generate(v.prompt, seeds=v.seed, from_noise=True, steps=2, guidance=3.0)
        np.testing.assert_allclose(v.latents, want.latents, rtol=0, atol=1e-5)


def test_requests_of_other_shapes_or_steps_run_in_their_own_batches(fake_engine):
    with Pipeline.open(fake_engine, "ort", max_batch=4) as pipe:
        videos = pipe.run([Request("a", 1, frames=3, steps=2), Request("b", 2, frames=5, steps=2),
                           Request("c", 3, frames=3, steps=2, guidance=9.0),
                           Request("d", 4, frames=3, steps=1)], from_noise=True)
        assert [v.prompt for v in videos] == ["a", "b", "c", "d"]
        assert [v.batch_size for v in videos] == [2, 1, 2, 1]
        assert [v.frames.shape[0] for v in videos] == [3, 5, 3, 3]
        alone, = pipe.run([Request("c", 3, frames=3, steps=2, guidance=9.0)], from_noise=True)
        np.testing.assert_allclose(videos[2].latents, alone.latents, rtol=0, atol=1e-5)
        assert videos[2].settings.guidance == 9.0 and videos[0].settings.guidance == 3.0  # the run's default


def test_prompts_and_seeds_pair_up(fake_engine):
    with Pipeline.open(fake_engine, "ort") as pipe:
        videos = pipe.generate("a man", seeds=[1, 2], from_noise=True, steps=1)
        assert [(v.prompt, v.seed) for v in videos] == [("a man", 1), ("a man", 2)]
        videos = pipe.generate(PROMPTS[:2], steps=1)  # the start latent, seed 0
        assert [v.seed for v in videos] == [0, 0] and videos[0].settings.steps == 1
        with pytest.raises(InputError, match="3 prompts and 2 seeds do not pair up"):
            pipe.generate(PROMPTS, seeds=[1, 2])
        with pytest.raises(InputError, match=r"--frames 40 is outside the engines' range 1\.\.6"):
            pipe.generate("x", from_noise=True, frames=40)
        with pytest.raises(InputError, match="prompt is too long"):
            pipe.generate("ski " * 100)


def test_video_save_and_encode(fake_engine, tmp_path):
    with Pipeline.open(fake_engine, "ort") as pipe:
        video, = pipe.generate("a man is skiing", steps=2)
    for fmt in ("mp4", "gif"):
        path = video.save(tmp_path / f"v.{fmt}")
        assert video.encode(fmt) == path.read_bytes()  # the same writer, in memory
        memory = tmp_path / f"m.{fmt}"
        memory.write_bytes(video.encode(fmt))
        np.testing.assert_array_equal(read_video(memory), read_video(path))
    with pytest.raises(OutputExistsError, match="already exists"):
        video.save(tmp_path / "v.gif")


@pytest.mark.slow
def test_batch_equals_one_at_a_time_on_the_exported_run(exported, tmp_path):
    """The real tiny networks (ONNX Runtime): a batch of 3 videos, from noise and from the
    inverted clip, equals each alone within 1e-5, with the exported profile (the UNet takes
    one guided video per call) and with a copy whose profile takes 3 (UNet batch 6); with
    --threads 2 the guidance halves run side by side and the result is the same."""
    _, exported_folder = exported
    wide = tmp_path / "wide"
    shutil.copytree(exported_folder, wide)

    def widen(d):
        for name, rows in (("text_encoder", 6), ("unet", 6), ("unet_feature", 6), ("vgt", 3)):
            if name in d["networks"]:  # the feature graph serves the UNet's calls where present
                d["networks"][name]["profile"]["batch"][2] = rows
    edit_manifest(wide, widen)  # manifest.json is not hashed; the ONNX graphs are batch-dynamic
    for folder, threads, unet_rows in ((exported_folder, 1, 2), (wide, 1, 6), (wide, 2, 3)):
        with Pipeline.open(folder, "ort", threads=threads, max_batch=3) as pipe:
            assert pipe.placement.split_guidance == (threads == 2)
            rows = _record_rows(pipe.engine.pool.runner("unet"))
            batch = pipe.generate(PROMPTS, seeds=[1, 2, 3], from_noise=True, steps=2)
            clip = pipe.generate(PROMPTS, steps=2)
            assert max(rows) == unet_rows
            alone = [pipe.generate(p, seeds=s, from_noise=True, steps=2)[0]
                     for p, s in zip(PROMPTS, [1, 2, 3])]
            alone_clip = [pipe.generate(p, steps=2)[0] for p in PROMPTS]
        for b, a in zip(batch + clip, alone + alone_clip):
            assert b.batch_size == 3 and a.batch_size == 1
            np.testing.assert_allclose(b.latents, a.latents, rtol=0, atol=1e-5)
            assert int(np.abs(b.frames.astype(int) - a.frames).max()) <= 1


def _record_rows(runner) -> list[int]:
    """Record the batch (rows) of every call of an opened runner."""
    rows: list[int] = []
    run = runner.run

    def recording(feeds):
        rows.append(int(feeds["sample"].shape[0]))
        return run(feeds)

    runner.run = recording
    return rows


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_writes_a_folder_with_an_index(fake_engine, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man is skiing\n\nthe man\n")
    out = tmp_path / "videos"
    result = run("generate", "--engine-dir", fake_engine, "--prompts-file", prompts, "--prompt", "a man",
                 "--from-noise", "--seed", "4", "--num-videos", "2", "--steps", "2", "--out", f"{out}/",
                 "--format", "gif", "--quiet")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert [(e["prompt"], e["seed"]) for e in index] == [
        ("a man", 4), ("a man", 5), ("a man is skiing", 4), ("a man is skiing", 5),
        ("the man", 4), ("the man", 5)]
    assert [e["file"] for e in index] == [f"{i:03d}-seed{4 + i % 2}.gif" for i in range(6)]
    for e in index:
        data = (out / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"]
    with Pipeline.open(fake_engine, "ort") as pipe:
        want, = pipe.generate("the man", seeds=5, from_noise=True, steps=2)
    # GIF is a palette format: FFmpeg's palettegen rounds through OkLab, off by 1 at most here
    got = read_video(out / "005-seed5.gif").astype(np.int16)
    assert got.shape == want.frames.shape and np.abs(got - want.frames).max() <= 2
    before = (out / "index.json").read_bytes()
    again = run("generate", "--engine-dir", fake_engine, "--prompt", "a man", "--prompt", "b",
                "--steps", "2", "--out", out, "--quiet")
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    assert (out / "index.json").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--seed", "1", "--seed", "2"], "several seeds give the same video unless the start is noise"),
    (["--from-noise", "--seed", "1", "--seed", "2", "--num-videos", "2"], "--num-videos takes one --seed"),
    (["--from-noise", "--seed", "1", "--seed", "1"], "--seed values repeat"),
    (["--prompts-file", "{tmp}/none.txt"], "--prompts-file {tmp}/none.txt does not exist"),
    (["--prompt", " "], "--prompt must not be empty"),
])
def test_cli_batch_input_errors(fake_engine, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run("generate", "--engine-dir", fake_engine, "--prompt", "a man", "--steps", "1",
                 "--out", tmp_path / "out/", "--quiet", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "out").exists()


def test_defaults_come_from_the_manifest(engine_copy):
    """steps and guidance are the run's; inversion steps its config's, else the sampling steps."""
    edit_manifest(engine_copy, lambda d: d.update(sample_defaults={"fps": 6.0},
                                                  config={"sample": {"steps": 3, "guidance": 2.5}}))
    rehash(engine_copy)
    with Pipeline.open(engine_copy, "ort") as pipe:
        video, = pipe.generate("a man")
        assert (video.settings.steps, video.settings.guidance) == (3, 2.5)
        assert pipe.inversion_steps() == 3
    edit_manifest(engine_copy, lambda d: d.update(config={"sample": {"inversion_steps": 7}}))
    rehash(engine_copy)
    with Pipeline.open(engine_copy, "ort") as pipe:
        assert pipe.inversion_steps() == 7
        with pytest.raises(InputError, match="does not record the run's steps; pass --steps"):
            pipe.generate("a man")


def _source_engine(engine_copy):
    """The fake folder with a VGT that reads the source latent (the manifest's own clean
    latent: the start latent's copy + 1), run by the NumPy twins, recording what it reads."""
    def edit(d):
        d["networks"]["vgt"]["inputs"].append(_tensor("source", "float32", ["batch", C, "frames", LAT, LAT]))
        d["source_latent"] = "source_latent.npy"
    np.save(engine_copy / "source_latent.npy", np.load(engine_copy / "start_latent.npy") + 1)
    edit_manifest(engine_copy, edit)
    rehash(engine_copy)
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(engine_copy, nets)
    seen = []
    engine.runners["vgt"].fn = lambda sample, timestep, source: seen.append(source.copy()) or nets.vgt(sample, timestep)
    return Pipeline(engine), seen


def test_vgt_source_edits_with_the_new_clips_clean_latent(engine_copy, tmp_path):
    from PIL import Image

    pipe, seen = _source_engine(engine_copy)
    folder = tmp_path / "clip"
    folder.mkdir()
    frames = (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:02d}.png")
    latent = pipe.invert(folder, steps=2)
    assert isinstance(latent, Latent) and latent.clean is not None
    assert all(np.array_equal(s, latent.clean) for s in seen)  # inversion reads the new clip
    seen.clear()
    pipe.generate("a man", latent=latent, steps=2)
    assert len(seen) == 2 and all(np.array_equal(s, latent.clean) for s in seen)
    seen.clear()
    pipe.generate("a man", steps=2)  # the training clip: the manifest's clean latent
    assert all(np.array_equal(s, np.load(engine_copy / "source_latent.npy")) for s in seen)
    with pytest.raises(InputError, match="pass the Latent that invert returned"):
        pipe.generate("a man", latent=latent.start, steps=2)
    # on disk: NAME.npy and NAME.source.npy (as apla-rt invert writes them)
    np.save(tmp_path / "z.npy", latent.start)
    with pytest.raises(InputError, match=r"writes it next to the latent as .*z\.source\.npy \(missing\)"):
        pipe.generate("a man", latent=tmp_path / "z.npy", steps=2)
    np.save(tmp_path / "z.source.npy", latent.clean)
    seen.clear()
    pipe.generate("a man", latent=tmp_path / "z.npy", steps=2)
    assert all(np.array_equal(s, latent.clean) for s in seen)


@pytest.mark.slow
def test_cli_invert_keeps_the_clean_latent_of_a_vgt_source_model(auto_default_out_export, source_run,
                                                                  tmp_path):
    """The exported vgt.source run: `apla-rt invert` of another clip writes z.npy and
    z.source.npy, and `generate --latent z.npy` samples with that clip's clean latent."""
    from conftest import EXAMPLE, clip_path

    from apla_rt.media.video import write_video

    result, cwd = auto_default_out_export
    assert result.exit_code == 0, result.output
    folder = cwd / "engines" / source_run.name
    clip = clip_path("car-turn.mp4")
    if clip == EXAMPLE:  # a plain clone trained on this clip: mirrored, it is another clip
        clip = write_video(tmp_path / "mirrored.mp4", np.ascontiguousarray(read_video(clip)[:, :, ::-1]))
    z = tmp_path / "z.npy"
    # ONNX Runtime fp32 throughout: the CLI's video is compared with the API's bit for bit, and
    # the measured choice may place a network on OpenVINO on some machines
    inverted = run("invert", clip, "--engine-dir", folder, "--out", z, "--steps", "2", "--quiet",
                   "--backend", "ort-cpu")
    assert inverted.exit_code == 0, inverted.output
    clean = np.load(tmp_path / "z.source.npy")
    assert clean.shape == np.load(z).shape
    assert not np.allclose(clean, np.load(folder / "source_latent.npy"))
    out = tmp_path / "edit.gif"
    assert run("generate", "--engine-dir", folder, "--prompt", "a car", "--latent", z, "--steps", "2",
               "--out", out, "--quiet", "--backend", "ort-cpu").exit_code == 0
    t = json.loads((tmp_path / "z.json").read_text())["timestep"]  # what invert recorded
    with Pipeline.open(folder, "ort-cpu") as pipe:
        want, = pipe.generate("a car", latent=Latent(np.load(z), clean, t), steps=2)
        training, = pipe.generate("a car", latent=Latent(np.load(z), np.load(folder / "source_latent.npy"), t),
                                  steps=2)
    np.testing.assert_array_equal(read_video(out), read_video(_gif(want, tmp_path)))
    assert float(np.abs(want.latents - training.latents).max()) > 1e-6  # the source matters


def _gif(video, tmp_path):
    path = tmp_path / "want.gif"
    video.save(path, force=True)
    return path
