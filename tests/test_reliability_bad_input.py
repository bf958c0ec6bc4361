"""Reliability, bad input (docs/reliability.md section 5): one table for the three CLIs; every
case is one clear line, exit code 2, no traceback, and no file in the session's "world"
created, changed or removed. One row per CLI again through the real console scripts, and
docs/reliability.md must list every case.

Everything runs on CPU with tiny models (4 frames of 32x32, 8x8 latents).
"""

from __future__ import annotations

import subprocess
import traceback
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from reliability_helpers import REPO, World, cli_command, cli_main, error_lines, snapshot


@dataclass(frozen=True)
class Case:
    id: str
    cli: str
    args: tuple[str, ...]
    fragment: str
    usage: bool = False  # click's own usage error: "Usage: ..." then one "Error: ..." line
    needs: str = ""  # "no-tensorrt": only where TensorRT is absent


TRAIN = ("--prompt", "a man is skiing", "--model", "tiny", "--frames", "4", "--size", "32", "--steps", "2",
         "--set", "sample.steps=1", "--set", "sample.inversion_steps=1", "--quiet")
ON_RUN = ("--out", "{run}", "--force")  # even --force must not touch the existing run


def train_case(id_, fragment, video="{clip}", *extra, out=ON_RUN, base=TRAIN, usage=False) -> Case:
    video_args = (video,) if video else ()
    return Case(id_, "apla-train", (*video_args, *base, *out, *extra), fragment, usage)


EXPORT = ("--backend", "onnx")


def export_case(id_, fragment, run="{run}", *extra, out="{w}/new-engine", usage=False, needs="") -> Case:
    run_args = ("--run", run) if run else ()
    return Case(id_, "apla-export", (*run_args, "--out", out, *EXPORT, *extra), fragment, usage, needs)


def rt_case(id_, fragment, *extra, engine="{engine}", prompt="a man is skiing", out="{w}/new.mp4",
            usage=False, needs="") -> Case:
    # ONNX Runtime on the CPU: the tampered file is its fused-attention flavour, which OpenVINO
    # (the measured choice on some machines) never opens
    args = ["generate", "--engine-dir", engine, "--steps", "1", "--quiet", "--backend", "ort-cpu"]
    if prompt is not None:
        args += ["--prompt", prompt]
    return Case(id_, "apla-rt", (*args, "--out", out, *extra), fragment, usage, needs)


def invert_case(id_, fragment, video, *extra) -> Case:
    return Case(id_, "apla-rt", ("invert", video, "--engine-dir", "{engine}", "--out", "{w}/new.npy",
                                 "--steps", "1", "--quiet", *extra), fragment)


CASES = [
    # apla-train: the clip
    train_case("train-video-missing", "does not exist", "{w}/inputs/nope.mp4"),
    train_case("train-video-empty", "is empty", "{w}/inputs/empty.mp4"),
    train_case("train-video-truncated-head", "is not a readable video", "{w}/inputs/head.mp4"),
    train_case("train-video-truncated-tail", "is not a readable video", "{w}/inputs/tail.mp4"),
    train_case("train-gif-truncated", "damaged or truncated", "{w}/inputs/cut.gif"),
    train_case("train-video-not-a-video", "is not a readable video", "{w}/inputs/text.mp4"),
    train_case("train-video-unsupported-type", "unsupported file type", "{w}/inputs/notes.txt"),
    train_case("train-video-folder-without-images", "holds no images", "{w}/inputs/noimages"),
    train_case("train-video-not-given", "missing VIDEO", ""),
    train_case("train-clip-shorter-than-asked", "has 48 frames but", "{clip}", "--frames", "40"),
    train_case("train-start-beyond-clip", "has 48 frames but", "{clip}", "--start", "60"),
    # apla-train: numbers
    train_case("train-steps-zero", "train.steps must be at least 1", "{clip}", "--steps", "0"),
    train_case("train-steps-negative", "train.steps must be at least 1", "{clip}", "--steps", "-5"),
    train_case("train-steps-absurd", "absurdly large", "{clip}", "--steps", "99999999999"),
    train_case("train-frames-zero", "data.n_frames must be at least 1", "{clip}", "--frames", "0"),
    train_case("train-frames-absurd", "exceeds vgt.max_frames", "{clip}", "--frames", "5000"),
    train_case("train-size-zero", "data.size must be at least 1", "{clip}", "--size", "0"),
    train_case("train-size-absurd", "absurdly large", "{clip}", "--size", "100000"),
    train_case("train-size-not-a-patch-multiple", "must be a multiple of 4 (the autoencoder's downsampling)", "{clip}",
               "--size", "30", out=("--out", "{w}/new-run")),
    train_case("train-stride-zero", "data.stride must be at least 1", "{clip}", "--stride", "0"),
    train_case("train-start-negative", "data.start must not be negative", "{clip}", "--start", "-1"),
    train_case("train-lr-nan", "train.lr must be positive", "{clip}", "--set", "train.lr=NaN"),
    train_case("train-lr-infinite", "train.lr must be a finite number", "{clip}", "--set", "train.lr=Infinity"),
    train_case("train-seed-absurd", "train.seed must be between", "{clip}", "--seed", str(2**70)),
    train_case("train-threads-zero", "--threads must be at least 1", "{clip}", "--threads", "0"),
    train_case("train-steps-not-a-number", "'abc' is not a valid integer", "{clip}", "--steps", "abc", usage=True),
    # apla-train: prompt, model, options, config
    train_case("train-prompt-missing", "--prompt is required", "{clip}", base=TRAIN[2:]),
    train_case("train-prompt-empty", "--prompt is required", "{clip}", "--prompt", ""),
    train_case("train-prompt-blank", "--prompt is required", "{clip}", "--prompt", "   "),
    train_case("train-prompt-too-long", "prompt is too long", "{clip}", "--prompt", "{long}"),
    train_case("train-model-not-given", "give --pretrained", "{clip}", base=("--prompt", "a man", "--quiet")),
    train_case("train-pretrained-missing", "is not a folder", "{clip}",
               base=("--prompt", "a man", "--pretrained", "{w}/inputs/nope", "--quiet")),
    train_case("train-pretrained-foreign", "lacks", "{clip}",
               base=("--prompt", "a man", "--pretrained", "{w}/inputs", "--quiet")),
    train_case("train-unknown-option", "No such option", "{clip}", "--bogus", usage=True),
    train_case("train-set-unknown-key", "unknown config key train.bogus", "{clip}", "--set", "train.bogus=1"),
    train_case("train-set-wrong-type", "train.lr must be a number", "{clip}", "--set", 'train.lr="fast"'),
    train_case("train-set-no-value", "--set expects key=value", "{clip}", "--set", "train.steps"),
    train_case("train-config-missing", "does not exist", "{clip}", "--config", "{w}/inputs/nope.json"),
    train_case("train-config-invalid", "is not valid json", "{clip}", "--config", "{w}/inputs/bad.json"),
    train_case("train-config-not-a-mapping", "must hold a mapping", "{clip}", "--config", "{w}/inputs/list.json"),
    # apla-train: output and resume
    train_case("train-out-exists", "already exists", "{clip}", out=("--out", "{run}")),
    train_case("train-out-is-a-file", "is a file", "{clip}", out=("--out", "{w}/afile")),
    train_case("train-out-under-a-file", "cannot create the run folder", "{clip}", out=("--out", "{w}/afile/sub/run")),
    Case("train-resume-not-a-run", "apla-train", ("--out", "{w}/runs/noconfig", "--resume"), "not a run folder"),
    Case("train-resume-corrupt-config", "apla-train", ("--out", "{w}/runs/badconfig", "--resume"), "is unreadable"),
    Case("train-resume-damaged-checkpoint", "apla-train", ("--out", "{w}/runs/damaged", "--resume", "--quiet"),
         "is missing or damaged"),
    Case("train-resume-foreign-checkpoint", "apla-train", ("--out", "{w}/runs/foreign", "--resume", "--quiet"),
         "does not match the model"),

    # apla-export: the run folder
    export_case("export-run-missing", "is not a training run folder", "{w}/runs/nope"),
    export_case("export-run-not-a-run", "is not a training run folder", "{w}/runs/noconfig"),
    export_case("export-run-is-a-file", "is not a training run folder", "{w}/afile"),
    export_case("export-run-only-partial-checkpoint", "no complete checkpoint", "{w}/runs/nockpt"),
    export_case("export-run-corrupt-config", "config.json", "{w}/runs/badconfig"),
    export_case("export-run-damaged-checkpoint", "is missing or damaged", "{w}/runs/damaged"),
    export_case("export-run-foreign-checkpoint", "does not match the model", "{w}/runs/foreign"),
    export_case("export-run-not-given", "give --run DIR", ""),
    # apla-export: numbers and options
    export_case("export-frames-min-zero", "--frames-min must be between 1 and 1024", "{run}", "--frames-min", "0"),
    export_case("export-frames-max-negative", "--frames-max must be between 1 and 1024", "{run}", "--frames-max", "-4"),
    export_case("export-frames-absurd", "--frames-max must be between 1 and 1024", "{run}", "--frames-max", "5000"),
    export_case("export-profile-inverted", "frame profile must satisfy", "{run}", "--frames-min", "8",
                "--frames-max", "4"),
    export_case("export-frames-beyond-vgt", "exceeds the VGT", "{run}", "--frames-max", "100"),
    export_case("export-threads-zero", "--threads must be between 1 and 1024", "{run}", "--threads", "0"),
    export_case("export-backend-unknown", "Invalid value for '--backend'", "{run}", "--backend", "tpu", usage=True),
    export_case("export-tensorrt-unavailable", "cannot build TensorRT engines", "{run}", "--backend", "trt",
                needs="no-tensorrt"),
    export_case("export-unknown-option", "No such option", "{run}", "--bogus", usage=True),
    # apla-export: output
    export_case("export-out-exists", "already exists", "{run}", out="{engine}"),
    export_case("export-out-under-a-file", "is not a folder", "{run}", out="{w}/afile/sub/eng"),

    # apla-rt: the engine folder
    rt_case("rt-engine-missing", "does not exist", engine="{w}/engines/nope"),
    rt_case("rt-engine-is-a-file", "is not a folder", engine="{w}/afile"),
    rt_case("rt-engine-partial", "has no manifest.json", engine="{w}/engines/partial"),
    rt_case("rt-engine-foreign", "is not an apla engine manifest", engine="{w}/engines/foreign"),
    rt_case("rt-manifest-not-json", "is not readable JSON", engine="{w}/engines/notjson"),
    rt_case("rt-manifest-unknown-version", "format_version 99", engine="{w}/engines/version"),
    rt_case("rt-artifact-tampered", ".ort.onnx does not match its sha256", engine="{w}/engines/tampered"),
    rt_case("rt-latent-tampered", "start_latent.npy does not match its sha256", engine="{w}/engines/tampered-latent"),
    rt_case("rt-path-dotdot", "points outside the engine folder", engine="{w}/engines/dotdot"),
    rt_case("rt-path-absolute", "is an absolute path", engine="{w}/engines/absolute"),
    rt_case("rt-path-symlink-out", "resolves outside the engine folder", engine="{w}/engines/symlink"),
    rt_case("rt-artifact-missing", "vgt.onnx is listed in the manifest but missing", engine="{w}/engines/noartifact"),
    Case("rt-info-verify-tampered", "apla-rt", ("info", "--engine-dir", "{w}/engines/tampered", "--verify"),
         ".ort.onnx does not match its sha256"),
    # apla-rt: numbers
    rt_case("rt-frames-beyond-profile", "outside the engines' range 1..24", "--frames", "30"),
    rt_case("rt-frames-zero", "--frames must be an integer >= 1", "--frames", "0"),
    rt_case("rt-frames-negative", "--frames must be an integer >= 1", "--frames", "-3"),
    rt_case("rt-steps-zero", "--steps must be an integer from 1 to 1000", "--steps", "0"),
    rt_case("rt-steps-negative", "--steps must be an integer from 1 to 1000", "--steps", "-1"),
    rt_case("rt-steps-absurd", "--steps must be an integer from 1 to 1000", "--steps", "100000"),
    rt_case("rt-guidance-nan", "--guidance must be a finite number", "--guidance", "nan"),
    rt_case("rt-fps-zero", "--fps must be in (0, 240]", "--fps", "0"),
    rt_case("rt-threads-zero", "--threads must be at least 1", "--threads", "0"),
    rt_case("rt-seed-negative", "--seed", "--seed", "-1", "--from-noise", usage=True),
    # apla-rt: prompt and options
    rt_case("rt-prompt-empty", "--prompt must not be empty", prompt=""),
    rt_case("rt-prompt-blank", "--prompt must not be empty", prompt="   "),
    rt_case("rt-prompt-too-long", "prompt is too long", prompt="{long}"),
    rt_case("rt-prompt-not-given", "Missing option '--prompt'", prompt=None, usage=True),
    rt_case("rt-unknown-option", "No such option", "--bogus", usage=True),
    rt_case("rt-tensorrt-unavailable", "--backend trt", "--backend", "trt", needs="no-tensorrt"),
    # apla-rt: latents and outputs
    rt_case("rt-latent-missing", "does not exist", "--latent", "{w}/inputs/nope.npy"),
    rt_case("rt-latent-pickled", "is not a readable .npy array", "--latent", "{w}/inputs/object.npy"),
    rt_case("rt-latent-not-npy", "is not a readable .npy array", "--latent", "{w}/inputs/bad.json"),
    rt_case("rt-latent-wrong-shape", "outside the engines' range", "--latent", "{w}/inputs/wrong.npy"),
    rt_case("rt-out-exists", "already exists; pass --force", out="{w}/video.mp4"),
    rt_case("rt-out-under-a-file", "is not a folder", out="{w}/afile/sub/video.mp4"),
    rt_case("rt-out-unknown-extension", "unknown extension '.avi'", out="{w}/new.avi"),
    invert_case("rt-invert-video-missing", "does not exist", "{w}/inputs/nope.mp4"),
    invert_case("rt-invert-not-a-video", "is not a readable video", "{w}/inputs/text.mp4"),
    invert_case("rt-invert-clip-shorter-than-asked", "has 48 frames but", "{clip}", "--frames", "20", "--stride", "4"),
    invert_case("rt-invert-frames-beyond-profile", "outside the engines' range 1..24", "{clip}", "--frames", "30",
                "--stride", "1"),
    Case("rt-invert-out-exists", "apla-rt", ("invert", "{clip}", "--engine-dir", "{engine}", "--out", "{w}/latent.npy",
                                             "--quiet"), "already exists; pass --force"),
]

def _tensorrt_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World):
    if case.needs == "no-tensorrt" and _tensorrt_present():
        pytest.skip("TensorRT is installed here: the backend is available")
    before = snapshot(world.root)
    result = CliRunner().invoke(cli_main(case.cli), [world.fmt(a) for a in case.args])
    after = snapshot(world.root)
    if result.exc_info and not isinstance(result.exception, SystemExit):
        raise AssertionError("traceback:\n" + "".join(traceback.format_exception(*result.exc_info)))
    assert "Traceback" not in result.output
    if case.usage:
        lines = error_lines(result.stderr, "Error:")
        assert result.stderr.startswith("Usage:"), result.stderr
    else:
        lines = error_lines(result.stderr)
        assert [line for line in result.stderr.splitlines() if line.strip()] == lines, result.stderr
    assert len(lines) == 1 and case.fragment in lines[0], result.stderr
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


@pytest.mark.parametrize("name, args, fragment", [
    ("apla-train", ["{w}/inputs/nope.mp4", *TRAIN, "--out", "{w}/new-run"], "does not exist"),
    ("apla-export", ["--run", "{w}/runs/nockpt", "--out", "{w}/new-engine"], "no complete checkpoint"),
    ("apla-rt", ["generate", "--engine-dir", "{w}/engines/tampered", "--prompt", "a man", "--out", "{w}/new.mp4",
                 "--backend", "ort-cpu"],
     "does not match its sha256"),
], ids=["train", "export", "rt"])
def test_bad_input_in_a_real_process(name, args, fragment, world):
    """The console scripts themselves: stderr is exactly the error line, exit code 2."""
    before = snapshot(world.root)
    proc = subprocess.run([*cli_command(name), *[world.fmt(a) for a in args]], capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert proc.returncode == 2
    assert snapshot(world.root) == before


def test_reliability_doc_lists_every_case():
    """docs/reliability.md names every table case and states their count."""
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not missing, missing
    assert f"{len(CASES)} cases" in doc
