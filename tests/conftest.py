"""Shared test fixtures: the real clips in the workplace's ``shared/data`` folder (else the
repository's ``examples/man-skiing.mp4``), ``require`` for the packages the test extra installs,
and every fixture that more than one test file uses, each built once per session:

* training: the shared tiny run (``tiny_run``, tests/test_train*.py), exported to ONNX once
  (``exported``, ``reference``: tests/test_rt_exported.py and the benchmarks' tests);
* runtime: the hand-made fake engine folder of tests/rt_fakes.py (``fake_engine``,
  ``engine_copy``: tests/test_rt_*.py);
* export: three tiny runs and their exports (tests/test_export_*.py, helpers in
  tests/export_helpers.py);
* reliability: a reference run, an engine folder written in a race and the bad-input "world"
  (tests/test_reliability_*.py, helpers in tests/reliability_helpers.py).

Helper modules are imported inside the fixtures, so collecting any one test file stays cheap.
"""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from reliability_helpers import World

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # shipped: man-skiing.mp4 (48 frames, 128 px)
EXAMPLE = EXAMPLES / "man-skiing.mp4"
TEST_EXTRA = 'pip install -e ".[test]"'


def require(module: str) -> Any:
    """``module``, imported; one the test extra installs is missing only from a broken install,
    so the test fails naming the extra (a skip would hide the coverage it loses)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        reason = str(err)
    pytest.fail(f"cannot import {module} ({reason}), which the test extra installs: {TEST_EXTRA}",
                pytrace=False)


def example_clip() -> Path:
    """The repository's ``examples/man-skiing.mp4``; its absence is a broken checkout: fails."""
    if not EXAMPLE.is_file():
        pytest.fail(f"{EXAMPLE} is missing: the repository ships it (git checkout -- examples/)",
                    pytrace=False)
    return EXAMPLE


def clip_path(name: str) -> Path:
    """The clip ``name`` in ``shared/data``, else the repository's ``examples/man-skiing.mp4``:
    the same clip, cut to 48 frames at 128 px, for ``man-skiing.mp4``; a stand-in real, moving
    clip for the others (``car-turn.mp4``). Tests of a clip's exact frames go by what the
    returned file holds."""
    if (SHARED_DATA / name).is_file():
        return SHARED_DATA / name
    return example_clip()


def pytest_addoption(parser):
    parser.addoption("--ui-screenshots", action="store_true",
                     help="write the browser test's screenshots into docs/ui/ (docs/ui.md shows them)")


# ---------------------------------------------------------------------------------------
# Training fixtures (tests/test_train*.py): one tiny trained run shared by the session


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    """The runtime's per-machine cache (bf16 verdicts, measured backend choices, OpenVINO's
    compiled models) in a folder of the session's, never the user's; subprocesses inherit it.
    Tests of the cache itself set their own."""
    import os

    old = os.environ.get("APLA_CACHE_DIR")
    os.environ["APLA_CACHE_DIR"] = str(tmp_path_factory.mktemp("apla-cache"))
    yield
    if old is None:
        os.environ.pop("APLA_CACHE_DIR", None)
    else:
        os.environ["APLA_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def _two_torch_threads():
    """The suite's timings assume 2 CPU threads, whatever the machine has."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def skiing() -> Path:
    """man-skiing.mp4: shared/data's (91 frames with an audio track), else examples/' excerpt."""
    return clip_path("man-skiing.mp4")


# The shared tiny run: 6 steps, checkpoints at 3 and 6, the adversarial term on from step 3,
# 4 frames at 32 px (8x8 latents), 2 sampling and 2 inversion steps.
TINY_RUN_ARGS = ["--prompt", "a man is skiing", "--model", "tiny", "--steps", "6", "--frames", "4",
                 "--size", "32", "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=3",
                 "--set", "loss.adv_start=2", "--set", "sample.steps=2", "--set", "sample.inversion_steps=2",
                 "--quiet"]


@pytest.fixture(scope="session")
def tiny_run_args() -> list[str]:
    """apla-train options of the shared tiny run (VIDEO and --out not included)."""
    return list(TINY_RUN_ARGS)


@pytest.fixture(scope="session")
def tiny_run(skiing, tmp_path_factory):
    """A tiny run trained once through ``apla-train`` (click's CliRunner): (folder, result)."""
    from click.testing import CliRunner

    from apla_train.cli import main

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    result = CliRunner().invoke(main, [str(skiing), "--out", str(run), *TINY_RUN_ARGS])
    assert result.exit_code == 0, result.output
    return run, result


@pytest.fixture
def empty_torch_hub(tmp_path):
    """torch hub pointed at an empty folder: no LPIPS backbone weights are available."""
    import torch

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(old)


@pytest.fixture(scope="session")
def alexnet_weights(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) torchvision AlexNet state dict: an offline LPIPS backbone."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------
# A real exported run (tests/test_rt_exported.py, tests/test_benchmarks.py): the shared tiny
# run, exported once


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """The session's ``tiny_run``, exported to ONNX once: (run, engine folder)."""
    from export.pipeline import export_run

    run, _ = tiny_run
    out = tmp_path_factory.mktemp("exported") / "engine"
    export_run(run, out, backend="onnx", log=lambda m: None)
    return run, out


@pytest.fixture(scope="session")
def reference(exported):
    """The PyTorch reference models of the run: (cfg, components, vgt)."""
    import torch

    from export.pipeline import load_run

    run, _ = exported
    torch.set_num_threads(2)
    cfg, components, vgt, _ = load_run(run)
    return cfg, components, vgt


# ---------------------------------------------------------------------------------------
# Runtime fixtures (tests/test_rt_*.py): the fake engine folder of tests/rt_fakes.py


@pytest.fixture(scope="session")
def fake_engine(tmp_path_factory) -> Path:
    """A read-only-by-convention fake engine folder; copy it before modifying."""
    from rt_fakes import make_engine_folder

    return make_engine_folder(tmp_path_factory.mktemp("fake") / "engine")


@pytest.fixture
def engine_copy(fake_engine, tmp_path) -> Path:
    out = tmp_path / "engine"
    shutil.copytree(fake_engine, out)
    return out


# ---------------------------------------------------------------------------------------
# Export fixtures (tests/test_export_*.py): three tiny runs trained once per session (4 frames
# of man-skiing.mp4 at 32 px, 8x8 latents): the main one (hyper VGT, 2 steps, checkpoints at
# steps 1 and 2), one with ``vgt.kind=none`` and one with ``vgt.source=true`` (1 step each).
# Each is exported once: the main run through ``export_run`` (``backend="onnx"``), the other
# two through the CLI (``--backend onnx --force`` over a copy of the main folder;
# ``--backend auto`` with the default ``--out``).


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(2)
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def ski_run(export_root) -> Path:
    """The main tiny run: hyper VGT, 2 steps, checkpoints at steps 1 and 2."""
    from export_helpers import train_tiny

    return train_tiny(export_root / "runs" / "ski", steps=2)


@pytest.fixture(scope="session")
def ski_engines(ski_run, export_root) -> tuple[Path, dict, list[str]]:
    """The main run exported once (ONNX only): (folder, returned manifest, log lines)."""
    from export import pipeline

    lines: list[str] = []
    out = export_root / "engines" / "ski"
    manifest = pipeline.export_run(ski_run, out, backend="onnx", log=lines.append)
    return out, manifest, lines


@pytest.fixture(scope="session")
def torch_side(ski_run):
    """The main run's networks rebuilt in PyTorch: (cfg, components, vgt, checkpoint)."""
    from export import pipeline

    return pipeline.load_run(ski_run)


@pytest.fixture(scope="session")
def novgt_run(export_root) -> Path:
    from export_helpers import train_tiny

    return train_tiny(export_root / "runs" / "ski-novgt", steps=1, flags={"vgt.kind": "none"},
                      sample_steps=1)


@pytest.fixture(scope="session")
def source_run(export_root) -> Path:
    from export_helpers import train_tiny

    return train_tiny(export_root / "runs" / "ski-source", steps=1, overrides=("vgt.source=true",),
                      sample_steps=1)


@pytest.fixture(scope="session")
def onnx_force_export(ski_engines, novgt_run, export_root):
    """``--backend onnx --force --no-cache-graphs`` of the VGT-less run over a copy of the main
    engine folder (the layout of a folder exported before the DeepCache graphs): (CLI result,
    folder, snapshot of the folder it replaced)."""
    from export_helpers import invoke, snapshot

    out = export_root / "replaced" / "ski"
    shutil.copytree(ski_engines[0], out)
    before = snapshot(out)
    result = invoke("--run", novgt_run, "--out", out, "--backend", "onnx", "--force", "--no-cache-graphs")
    return result, out, before


@pytest.fixture(scope="session")
def auto_default_out_export(source_run, export_root):
    """``--backend auto`` without --out, cwd = an empty folder, on the vgt.source run:
    (CLI result, cwd)."""
    from export_helpers import invoke

    cwd = export_root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = invoke("--run", source_run.resolve(), "--backend", "auto")
    return result, cwd


# ---------------------------------------------------------------------------------------
# Reliability fixtures (tests/test_reliability_*.py): one reference run (real apla-train
# process) and one engine folder, and the bad-input world built from them


@pytest.fixture(scope="session")
def clip() -> Path:
    from reliability_helpers import CLIP

    example_clip()  # fails, naming it, when the shipped clip is missing
    return CLIP


@pytest.fixture(scope="session")
def ref_run(clip, tmp_path_factory) -> Path:
    """The uninterrupted reference: 12 steps, checkpoints every 2, the adversarial term from
    step 3, through the real ``apla-train`` console script."""
    from reliability_helpers import RUN_ARGS, cli_command

    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run([*cli_command("apla-train"), str(clip), "--out", str(run), *RUN_ARGS],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return run


@pytest.fixture(scope="session")
def export_race(ref_run, tmp_path_factory):
    """A real ``apla-export`` process writes the session's engine folder; while it holds the
    folder (paused with SIGSTOP, so the race is deterministic) a second export of the same
    folder runs in this process. Returns (engine folder, second result, paths seen meanwhile)."""
    from click.testing import CliRunner
    from reliability_helpers import cli_command, cli_main

    root = tmp_path_factory.mktemp("engines")
    out = root / "eng"
    with open(root / "export.log", "w") as log:
        proc = subprocess.Popen([*cli_command("apla-export"), "--run", str(ref_run), "--out", str(out),
                                 "--backend", "onnx", "--threads", "1"], stdout=log, stderr=log)
    try:
        deadline = time.time() + 300
        while not list(root.glob(".eng.*.partial")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, (root / "export.log").read_text()
        proc.send_signal(signal.SIGSTOP)  # the first exporter holds the lock and a partial folder
        second = CliRunner().invoke(cli_main("apla-export"), ["--run", str(ref_run), "--out", str(out),
                                                              "--backend", "onnx"])
        seen = sorted(p.name for p in root.iterdir())
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=600) == 0, (root / "export.log").read_text()
    assert "Traceback" not in (root / "export.log").read_text()
    return out, second, seen


@pytest.fixture(scope="session")
def engine(export_race) -> Path:
    return export_race[0]


@pytest.fixture(scope="session")
def world(ref_run, engine, tmp_path_factory) -> World:
    """A folder of existing outputs and bad inputs (``World``) that no bad-input case may change."""
    import numpy as np
    from reliability_helpers import CLIP, World, _copy_run, _edit_manifest

    w = tmp_path_factory.mktemp("world")
    shutil.copytree(ref_run, w / "run")
    shutil.copytree(engine, w / "engine")
    shutil.copy2(ref_run / "sample.mp4", w / "video.mp4")  # an existing output
    shutil.copy2(ref_run / "start_latent.npy", w / "latent.npy")
    (w / "afile").write_text("a regular file\n")

    inputs = w / "inputs"
    inputs.mkdir()
    clip_bytes = CLIP.read_bytes()
    (inputs / "empty.mp4").write_bytes(b"")
    (inputs / "text.mp4").write_text("not a video\n")
    (inputs / "notes.txt").write_text("not a video either\n")
    (inputs / "head.mp4").write_bytes(clip_bytes[:2048])
    (inputs / "tail.mp4").write_bytes(clip_bytes[:len(clip_bytes) * 6 // 10])
    gif = (ref_run / "sample.gif").read_bytes()
    (inputs / "cut.gif").write_bytes(gif[:len(gif) * 6 // 10])
    (inputs / "noimages").mkdir()
    (inputs / "noimages" / "readme.txt").write_text("no frames here\n")
    (inputs / "bad.json").write_text("{not json")
    (inputs / "list.json").write_text("[1, 2]")
    np.save(inputs / "object.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    np.save(inputs / "wrong.npy", np.zeros((1, 4, 4, 5, 5), np.float32))

    runs = w / "runs"
    (runs / "noconfig").mkdir(parents=True)
    (runs / "nockpt").mkdir()
    shutil.copy2(ref_run / "config.json", runs / "nockpt" / "config.json")
    (runs / "nockpt" / "checkpoints" / ".step-00000002.partial").mkdir(parents=True)
    (runs / "nockpt" / "checkpoints" / ".step-00000002.partial" / "model.safetensors").write_bytes(b"half")
    (runs / "badconfig").mkdir()
    (runs / "badconfig" / "config.json").write_text('{"prompt": "a man", ')
    last = _copy_run(ref_run, runs / "damaged")
    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[:len(data) // 2])
    _copy_run(ref_run, runs / "foreign")
    cfg = json.loads((runs / "foreign" / "config.json").read_text())
    cfg["vgt"]["dim"] = 32  # another VGT width: the checkpoint's shapes do not fit
    (runs / "foreign" / "config.json").write_text(json.dumps(cfg))

    engines = w / "engines"
    engines.mkdir()

    def engine_copy(name: str, edit) -> None:
        shutil.copytree(engine, engines / name)
        edit(engines / name)

    def flip_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    def symlink_out(folder: Path) -> None:
        (folder / "unet.onnx").unlink()
        (folder / "unet.onnx").symlink_to(engine / "unet.onnx")

    engine_copy("partial", lambda d: (d / "manifest.json").unlink())
    engine_copy("foreign", lambda d: _edit_manifest(d, lambda m: m.update(format="someone-elses")))
    engine_copy("version", lambda d: _edit_manifest(d, lambda m: m.update(format_version=99)))
    engine_copy("notjson", lambda d: (d / "manifest.json").write_text('{"format": "apla-engines", '))
    # the UNet graph the CPU runtime opens: the ORT-fused flavour of the graph that serves the
    # UNet's calls (the DeepCache feature graph where the folder has one)
    from apla_rt.backends.placement import serving_graph
    from apla_rt.folder.manifest import Manifest

    served = serving_graph(Manifest.open(engine), "unet")
    engine_copy("tampered", lambda d: flip_byte(d / f"{served}.ort.onnx"))
    engine_copy("tampered-latent", lambda d: flip_byte(d / "start_latent.npy"))
    engine_copy("dotdot", lambda d: _edit_manifest(d, lambda m: m["networks"]["unet"].update(onnx="../engine/unet.onnx")))
    engine_copy("absolute", lambda d: _edit_manifest(d, lambda m: m["networks"]["unet"].update(onnx=str(engine / "unet.onnx"))))
    engine_copy("symlink", symlink_out)
    engine_copy("noartifact", lambda d: (d / "vgt.onnx").unlink())
    return World(w)
