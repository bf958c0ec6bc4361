"""``apla-rt`` through click's CliRunner: the commands, and the bad-input table (every case a
one-line ``error:`` and exit code 2, no traceback, and no file written or lost)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rt_fakes import make_engine_folder

from apla_rt.cli import main
from apla_rt.media.video import read_video


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return make_engine_folder(tmp_path_factory.mktemp("cli") / "engine")


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def gen(engine: Path, out: Path, *extra: str):
    return run("generate", "--engine-dir", engine, "--prompt", "a man is skiing", "--out", out,
               "--steps", "2", "--quiet", *extra)


def assert_user_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert len(lines) == 1, lines


def test_generate_writes_video_and_timings(engine, tmp_path):
    out = tmp_path / "v.mp4"
    result = run("generate", "--engine-dir", engine, "--prompt", "a man is skiing", "--out", out,
                 "--steps", "3", "--guidance", "7.5", "--timings")
    assert result.exit_code == 0, result.output
    assert read_video(out).shape == (4, 8, 8, 3)
    assert "wrote" in result.stderr and "VGT on" in result.stderr
    for stage in ("text encoder", "unet", "vgt", "solver", "vae", "video write", "total"):
        assert stage in result.stdout
    gif = tmp_path / "v.gif"
    result = gen(engine, gif, "--from-noise", "--frames", "5", "--seed", "3", "--no-vgt")
    assert result.exit_code == 0, result.output
    assert read_video(gif).shape[0] == 5 and result.stdout == ""


def test_generate_never_overwrites_without_force(engine, tmp_path):
    out = tmp_path / "v.gif"
    out.write_bytes(b"precious")
    assert_user_error(gen(engine, out), "already exists; pass --force")
    assert out.read_bytes() == b"precious"
    assert gen(engine, out, "--force").exit_code == 0
    assert read_video(out).shape[0] == 4


def _bad_engines(root: Path, engine: Path) -> dict[str, Path]:
    """Copies of the engine folder, each broken one way."""
    out = {}
    for kind in ("version", "tampered", "escape", "nomanifest"):
        copy = root / kind
        shutil.copytree(engine, copy)
        out[kind] = copy
    data = json.loads((out["version"] / "manifest.json").read_text())
    data["format_version"] = 7
    (out["version"] / "manifest.json").write_text(json.dumps(data))
    blob = bytearray((out["tampered"] / "unet.onnx").read_bytes())
    blob[100] ^= 0x10
    (out["tampered"] / "unet.onnx").write_bytes(bytes(blob))
    data = json.loads((out["escape"] / "manifest.json").read_text())
    data["start_latent"] = "../../secret.npy"
    (out["escape"] / "manifest.json").write_text(json.dumps(data))
    (out["nomanifest"] / "manifest.json").unlink()
    return out


BAD_GENERATE = [
    (["--steps", "0"], "--steps must be an integer from 1 to 1000"),
    (["--steps", "1001"], "--steps must be an integer from 1 to 1000"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--frames", "0", "--from-noise"], "--frames must be an integer >= 1"),
    (["--frames", "40", "--from-noise"], "--frames 40 is outside the engines' range 1..6 (frames)"),
    (["--frames", "3"], "pass --from-noise"),
    (["--latent", "missing.npy"], "does not exist"),
    (["--latent", "missing.npy", "--from-noise"], "exclude each other"),
    (["--prompt", "x" * 100], "prompt is too long: 102 tokens"),
    (["--prompt", "  "], "--prompt must not be empty"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--fps", "0"], "--fps must be in (0, 240]"),
    (["--backend", "trt"], "--backend trt: the engine folder has no TensorRT engine"),
]


@pytest.mark.parametrize("extra, message", BAD_GENERATE, ids=[" ".join(a)[:30] for a, _ in BAD_GENERATE])
def test_generate_bad_input(engine, tmp_path, extra, message):
    out = tmp_path / "v.mp4"
    assert_user_error(gen(engine, out, *extra), message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist; export one with apla-export"),
    ("nomanifest", "has no manifest.json"),
    ("version", "format_version 7; this apla-rt reads format_version 1"),
    ("tampered", "unet.onnx does not match its sha256"),
    ("escape", "points outside the engine folder"),
])
def test_generate_bad_engine_folder(engine, tmp_path, kind, message):
    bad = _bad_engines(tmp_path, engine)
    folder = bad.get(kind, tmp_path / "missing")
    out = tmp_path / "v.mp4"
    assert_user_error(gen(folder, out), message)
    assert not out.exists()


def test_bad_extension_and_unknown_backend(engine, tmp_path):
    assert_user_error(gen(engine, tmp_path / "v.avi"), "unknown extension '.avi'; use .mp4 or .gif")
    result = gen(engine, tmp_path / "v.mp4", "--backend", "cuda")
    assert result.exit_code == 2 and "Invalid value for '--backend'" in result.output
    assert not (tmp_path / "v.mp4").exists()


def test_info(engine, tmp_path):
    result = run("info", "--engine-dir", engine, "--verify")
    assert result.exit_code == 0, result.output
    for text in ("prompt: 'a man is skiing'", "frames: 1..6 (opt 4)", "unet  [unet.onnx]",
                 "in  sample", "batch 1..2 (opt 2)", "backend (auto): onnxruntime-cpu", "sha256 verified",
                 "versions: apla test", "start_latent.npy [1, 4, 4, 4, 4]"):
        assert text in result.output, text
    data = json.loads(run("info", "--engine-dir", engine, "--json").output)
    assert data["format_version"] == 1
    assert_user_error(run("info", "--engine-dir", tmp_path / "none"), "does not exist")


def test_invert(engine, tmp_path):
    frames = tmp_path / "clip.gif"
    from apla_rt.media.video import write_video

    write_video(frames, (np.random.default_rng(0).random((6, 16, 16, 3)) * 255).astype(np.uint8))
    out = tmp_path / "z.npy"
    result = run("invert", frames, "--engine-dir", engine, "--out", out, "--steps", "3", "--quiet",
                 "--timings")
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 4, 4, 4, 4) and "unet" in result.stdout
    before = out.read_bytes()
    assert_user_error(run("invert", frames, "--engine-dir", engine, "--out", out, "--quiet"),
                      "already exists; pass --force")
    assert out.read_bytes() == before
    assert_user_error(run("invert", tmp_path / "none.mp4", "--engine-dir", engine, "--out",
                          tmp_path / "y.npy", "--quiet"), "does not exist")
    assert_user_error(run("invert", frames, "--engine-dir", engine, "--out", tmp_path / "y.npy",
                          "--steps", "0"), "--steps must be an integer from 1 to 1000")
    # the inverted latent starts a generation
    video = tmp_path / "edit.gif"
    assert gen(engine, video, "--latent", out).exit_code == 0
    assert read_video(video).shape[0] == 4
