"""Reliability and safety: nothing lost under faults, bad input or tampered artifacts.

docs/reliability.md lists every case below with its expected message and test id.

1. Resume: a real ``apla-train`` process killed with SIGKILL at a random step and continued
   with ``--resume`` ends bit-identical to an uninterrupted run; only complete checkpoints
   are visible, leftovers are cleaned, old ones pruned.
2. Numerical faults: a non-finite loss or gradient stops training with one line naming the
   step and the last good checkpoint (left intact); ``--skip-nonfinite`` skips and counts.
3. Atomic outputs: write failures (a full disk, a read-only folder) leave no half-written
   file and change no existing one; two exports to one folder: the second refuses.
4. Safe loading: no pickle anywhere in the product code; the runtime refuses tampered
   artifacts, paths leaving the engine folder and unknown manifest versions.
5. Bad input: one table for the three CLIs; every case is one clear line, a non-zero exit,
   no traceback, and no file in the test's world created, changed or removed.

Everything runs on CPU with tiny models (4 frames of 32x32, 8x8 latents); one run and one
engine folder are shared by the session.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from apla_train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "examples" / "man-skiing.mp4"  # 48 frames, 128x128, in the repository
STEPS = 12
RUN_ARGS = ["--prompt", "a man is skiing", "--model", "tiny", "--frames", "4", "--size", "32",
            "--steps", str(STEPS), "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2",
            "--set", "loss.adv_start=3", "--set", "sample.steps=2", "--set", "sample.inversion_steps=2",
            "--quiet", "--threads", "1"]
MODULES = {"apla-train": "apla_train.cli", "apla-export": "export.cli", "apla-rt": "apla_rt.cli"}


def cli_command(name: str) -> list[str]:
    """The installed console script next to this Python, else ``python -m`` its module."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", MODULES[name]]


def cli_main(name: str):
    if name == "apla-train":
        from apla_train.cli import main
    elif name == "apla-export":
        from export.cli import main
    else:
        from apla_rt.cli import main
    return main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_HASHES: dict[tuple, str] = {}


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under ``root`` -> sha256 (files) or None (folders); lock files aside.

    A file whose (inode, size, mtime, ctime) is unchanged keeps its earlier hash: any write,
    rename or replacement changes one of them, so nothing is missed and nothing rehashed.
    """
    out: dict[str, str | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.endswith(".lock"):
            continue
        if path.is_symlink() or not path.is_file():
            out[rel] = None if not path.is_symlink() else f"-> {os.readlink(path)}"
            continue
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _HASHES:
            _HASHES[key] = sha256(path)
        out[rel] = _HASHES[key]
    return out


def error_lines(text: str, prefix: str = "error:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def assert_clean_failure(result, fragment: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line containing ``fragment``."""
    if result.exc_info and not isinstance(result.exception, SystemExit):
        raise AssertionError("traceback:\n" + "".join(traceback.format_exception(*result.exc_info)))
    assert "Traceback" not in result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert result.exit_code == code, (result.exit_code, result.stderr)
    return lines[0]


# ---------------------------------------------------------------------------------------
# Session fixtures: one reference run (real apla-train process) and one engine folder


@pytest.fixture(scope="session")
def clip() -> Path:
    if not CLIP.is_file():
        pytest.skip(f"example clip {CLIP} is not available")
    return CLIP


@pytest.fixture(scope="session")
def ref_run(clip, tmp_path_factory) -> Path:
    """The uninterrupted reference: 12 steps, checkpoints every 2, the adversarial term from
    step 3, through the real ``apla-train`` console script."""
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


@dataclass
class World:
    """A folder of existing outputs and bad inputs; no case may change anything in it."""

    root: Path

    def fmt(self, arg: str) -> str:
        return arg.format(w=self.root, clip=CLIP, run=self.root / "run", engine=self.root / "engine",
                          long="ski " * 300)


def _copy_run(src: Path, dst: Path) -> Path:
    """config.json, base/ and the latest checkpoint of a run (what loading needs)."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    shutil.copytree(src / "base", dst / "base")
    last = ckpt.latest_checkpoint(src)
    shutil.copytree(last, dst / "checkpoints" / last.name)
    return dst / "checkpoints" / last.name


def _edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


@pytest.fixture(scope="session")
def world(ref_run, engine, tmp_path_factory) -> World:
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
    engine_copy("tampered", lambda d: flip_byte(d / "unet.onnx"))
    engine_copy("tampered-latent", lambda d: flip_byte(d / "start_latent.npy"))
    engine_copy("dotdot", lambda d: _edit_manifest(d, lambda m: m["networks"]["unet"].update(onnx="../engine/unet.onnx")))
    engine_copy("absolute", lambda d: _edit_manifest(d, lambda m: m["networks"]["unet"].update(onnx=str(engine / "unet.onnx"))))
    engine_copy("symlink", symlink_out)
    engine_copy("noartifact", lambda d: (d / "vgt.onnx").unlink())
    return World(w)


# ---------------------------------------------------------------------------------------
# 1. Resume after SIGKILL


def _checkpoint_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(path / name)) for name in
            ("model.safetensors", "disc.safetensors", "optim.safetensors", "rng.safetensors")}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        differ = [k for k in ta[name] if not torch.equal(ta[name][k], tb[name][k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    for name in ("optim.json", "state.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def assert_complete_outputs(run: Path) -> None:
    """What a killed run leaves at final paths is complete: it parses or loads in full."""
    json.loads((run / "config.json").read_text())
    for _step, path in ckpt.list_checkpoints(run):
        _checkpoint_tensors(path)
        json.loads((path / "optim.json").read_text())
        ckpt.read_state(path)
    lines = (run / "metrics.jsonl").read_text().split("\n") if (run / "metrics.jsonl").exists() else []
    for line in lines[:-1]:  # only the line being appended when the process died may be torn
        json.loads(line)
    assert not (run / "summary.json").exists() or json.loads((run / "summary.json").read_text())
    assert not (run / "start_latent.npy").exists() or np.load(run / "start_latent.npy").size


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(ref_run, clip, tmp_path):
    seed = int(os.environ.get("APLA_KILL_SEED") or random.SystemRandom().randrange(2**32))
    k = random.Random(seed).randint(1, STEPS - 1)
    why = f"(killed once metrics.jsonl had >= {k} lines; rerun with APLA_KILL_SEED={seed})"
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*cli_command("apla-train"), str(clip), "--out", str(run), *RUN_ARGS],
                                stdout=log, stderr=log)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and metrics.read_bytes().count(b"\n") >= k:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{why}\n{(tmp_path / 'killed.log').read_text()}"

    # only complete checkpoints are visible, on the configured cadence, pruned to keep=2
    found = ckpt.list_checkpoints(run)
    assert all(step % 2 == 0 for step, _ in found) and len(found) <= 2, (found, why)
    assert_complete_outputs(run)
    leftover = run / "checkpoints" / ".step-00000099.partial"  # as a kill during a save leaves it
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert ckpt.latest_checkpoint(run) == (found[-1][1] if found else None)

    resumed = subprocess.run([*cli_command("apla-train"), "--out", str(run), "--resume", "--quiet",
                              "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"{why}\n{resumed.stderr}"
    assert "Traceback" not in resumed.stderr
    expected = f"resumed from checkpoints/{found[-1][1].name}" if found else "no checkpoint yet"
    assert expected in resumed.stderr, why

    assert not list((run / "checkpoints").glob(".step-*.partial")), "leftover partial not cleaned"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [STEPS - 2, STEPS]
    assert_same_checkpoint(ckpt.checkpoint_dir(ref_run, STEPS), ckpt.checkpoint_dir(run, STEPS))
    assert_same_checkpoint(ckpt.checkpoint_dir(ref_run, STEPS - 2), ckpt.checkpoint_dir(run, STEPS - 2))
    assert (run / "metrics.jsonl").read_text() == (ref_run / "metrics.jsonl").read_text(), why
    assert np.array_equal(np.load(run / "start_latent.npy"), np.load(ref_run / "start_latent.npy"))
    a, b = (json.loads((r / "summary.json").read_text()) for r in (ref_run, run))
    for key in ("loss_first10", "loss_last10", "reconstruction_psnr_db", "skipped_nonfinite"):
        assert a[key] == b[key], key


def test_partial_checkpoints_are_invisible_and_old_ones_pruned(tmp_path):
    """``latest_checkpoint`` sees only renamed, complete folders; a save cleans leftovers and
    prunes to ``keep``."""
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-00000008.partial").mkdir(parents=True)
    (run / "checkpoints" / "step-00000009").mkdir()  # no state.json: never complete
    assert ckpt.latest_checkpoint(run) is None
    weights = {"w": torch.ones(3)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    for step in (2, 4, 6):
        ckpt.save_checkpoint(run, step, unet_trainable=weights, vgt=None, disc=None,
                             optimizers={"generator": opt}, generator=torch.Generator().manual_seed(0),
                             config={}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6]
    assert ckpt.latest_checkpoint(run).name == "step-00000006"
    assert not list((run / "checkpoints").glob(".step-*.partial"))


# ---------------------------------------------------------------------------------------
# 2. Numerical faults


def tiny_config(**train):
    from apla_train.config import from_dict, merge, tiny_preset

    data = merge(tiny_preset(), {
        "video": str(CLIP), "prompt": "a man is skiing", "data": {"n_frames": 4, "size": 32},
        "train": {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, **train},
        "loss": {"adv_start": 1}, "sample": {"steps": 1, "inversion_steps": 1}})
    return from_dict(data).validate()


def poison(monkeypatch, at: set[int], kind: str, on_fault=None) -> None:
    """Make the Hyper-Loss terms of the given steps (1-based calls) non-finite: the loss
    itself ("loss"), or a finite loss whose gradient is NaN ("gradient")."""
    import apla_train.train as train_module

    real = train_module.hyper_terms
    calls = {"n": 0}

    def terms(eps_hat, eps):
        calls["n"] += 1
        out = real(eps_hat, eps)
        if calls["n"] in at:
            if on_fault is not None:
                on_fault(calls["n"])
            if kind == "loss":
                out["mse"] = out["mse"] * float("nan")
            else:  # sqrt'(0) = inf, times d(0 * x)/dx = 0: NaN gradient, finite (zero) value
                out["mse"] = out["mse"] + torch.sqrt(eps_hat * 0).sum()
        return out

    monkeypatch.setattr(train_module, "hyper_terms", terms)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_stops_naming_the_step_and_an_intact_checkpoint(kind, clip, tmp_path, monkeypatch):
    from apla_rt.errors import NonFiniteError
    from apla_train.train import train

    run = tmp_path / "run"
    before = {}
    poison(monkeypatch, {3}, kind, on_fault=lambda _n: before.update(folder_hashes(ckpt.checkpoint_dir(run, 2))))
    with pytest.raises(NonFiniteError) as err:
        train(tiny_config(), run, log=lambda _m: None, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"non-finite {kind} at step 3" in message
    assert "last good checkpoint: checkpoints/step-00000002" in message
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert before and folder_hashes(ckpt.checkpoint_dir(run, 2)) == before
    assert not list((run / "checkpoints").glob(".*"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_skip_nonfinite_skips_and_counts(clip, tmp_path, monkeypatch):
    from apla_train.train import train

    run = tmp_path / "run"
    poison(monkeypatch, {2}, "loss")
    poison(monkeypatch, {4}, "gradient")  # the last step: its checkpoint must still be written
    summary = train(tiny_config(skip_nonfinite=True), run, log=lambda _m: None, progress=False)
    assert summary["skipped_nonfinite"] == 2
    assert json.loads((run / "summary.json").read_text())["skipped_nonfinite"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("skipped") for r in records] == [None, "loss", None, "gradient"]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]
    for tensors in _checkpoint_tensors(ckpt.checkpoint_dir(run, 4)).values():
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_non_finite_through_the_cli_is_one_error_line(clip, tmp_path, monkeypatch):
    poison(monkeypatch, {2}, "loss")
    result = CliRunner().invoke(cli_main("apla-train"), [
        str(clip), "--out", str(tmp_path / "run"), "--prompt", "a man is skiing", "--model", "tiny",
        "--frames", "4", "--size", "32", "--steps", "3", "--set", "train.checkpoint_every=1",
        "--set", "sample.steps=1", "--set", "sample.inversion_steps=1", "--quiet"])
    line = assert_clean_failure(result, "non-finite loss at step 2")
    assert "last good checkpoint: checkpoints/step-00000001" in line and "--skip-nonfinite" in line


# ---------------------------------------------------------------------------------------
# 3. Atomic outputs: write failures, --force, two exporters


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_file_and_folder_survive_a_failing_write(tmp_path):
    from apla_rt import atomic
    from apla_rt.errors import AplaError, OutputExistsError

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_full(path: Path) -> None:
        path.write_bytes(b"new but only ha")
        raise ENOSPC

    with pytest.raises(OutputExistsError):
        atomic.write_bytes(target, b"new")
    with pytest.raises(AplaError, match="No space left on device"):
        atomic.write_file(target, half_then_full, force=True)
    assert target.read_bytes() == b"old"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("old")
    with pytest.raises(OSError), atomic.atomic_dir(folder, force=True) as tmp:
        (tmp / "keep.txt").write_text("new")
        raise ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.bin"]
    assert (folder / "keep.txt").read_text() == "old"


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(clip, tmp_path, monkeypatch):
    from apla_rt.errors import AplaError
    from apla_train.train import train

    run = tmp_path / "run"
    real = ckpt.save_file
    before = {}

    def save_file(tensors, path, *args, **kwargs):
        if "step-00000004" in str(path):
            before.update(folder_hashes(ckpt.checkpoint_dir(run, 2)))
            Path(path).write_bytes(b"half")
            raise ENOSPC
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(AplaError) as err:
        train(tiny_config(), run, log=lambda _m: None, progress=False)
    assert "could not write checkpoint step-00000004: No space left on device" in str(err.value)
    assert "step-00000002 is kept" in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert folder_hashes(ckpt.checkpoint_dir(run, 2)) == before
    assert not list((run / "checkpoints").glob(".*"))


def test_video_write_failure_leaves_no_file(engine, ref_run, tmp_path, monkeypatch):
    import apla_rt.video as video

    def half_then_full(tmp: Path, frames, fps) -> None:
        tmp.write_bytes(b"\x00\x00\x00\x18ftypisom")
        raise ENOSPC

    monkeypatch.setattr(video, "_write_mp4", half_then_full)
    existing = tmp_path / "existing.mp4"
    shutil.copy2(ref_run / "sample.mp4", existing)
    for out, extra in ((tmp_path / "new.mp4", []), (existing, ["--force"])):
        before = snapshot(tmp_path)
        result = CliRunner().invoke(cli_main("apla-rt"), [
            "generate", "--engine-dir", str(engine), "--prompt", "a man is skiing", "--steps", "1",
            "--out", str(out), "--quiet", *extra])
        assert_clean_failure(result, "No space left on device")
        assert snapshot(tmp_path) == before


def test_two_exports_to_one_folder_the_second_refuses(export_race):
    out, second, seen = export_race
    assert_clean_failure(second, "another apla-export is writing")
    assert out.name not in seen  # the first had not finished; the second wrote nothing either
    from apla_rt.manifest import Manifest

    Manifest.open(out).verify()  # the first export completed and is intact


@contextlib.contextmanager
def tmpfs(path: Path, size: int, read_only: bool = False):
    """A small tmpfs at ``path`` (root only): a disk that really fills up or is read-only."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here; the monkeypatched write-failure tests still run")
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip()}); the monkeypatched write-failure tests still run")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)


def test_full_disk_while_training_keeps_the_last_checkpoint(ref_run, tmp_path):
    """A resumed run on a disk with room for its steps' metrics but not for a checkpoint."""
    src = tmp_path / "src"
    _copy_run(ref_run, src)
    shutil.rmtree(src / "checkpoints" / f"step-{STEPS:08d}")
    shutil.copytree(ckpt.checkpoint_dir(ref_run, STEPS - 2), ckpt.checkpoint_dir(src, STEPS - 2))
    lines = (ref_run / "metrics.jsonl").read_text().splitlines()[:STEPS - 2]
    (src / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    need = sum(-(-p.stat().st_size // 4096) * 4096 for p in src.rglob("*") if p.is_file())
    with tmpfs(tmp_path / "disk", need + (1 << 20)) as disk:
        run = disk / "run"
        shutil.copytree(src, run)
        before = snapshot(run)
        result = CliRunner().invoke(cli_main("apla-train"), ["--out", str(run), "--resume", "--quiet"])
        line = assert_clean_failure(result, "No space left on device")
        assert f"step-{STEPS - 2:08d} is kept" in line
        after = snapshot(run)
        assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == \
            {k: v for k, v in before.items() if k != "metrics.jsonl"}  # nothing else written
        assert (run / "metrics.jsonl").read_text().startswith((src / "metrics.jsonl").read_text())
        assert ckpt.latest_checkpoint(run).name == f"step-{STEPS - 2:08d}"


def test_full_disk_on_a_new_run_leaves_nothing(clip, tmp_path):
    with tmpfs(tmp_path / "disk", 256 << 10) as disk:
        (disk / "keep.txt").write_text("an existing file")
        before = snapshot(disk)
        result = CliRunner().invoke(cli_main("apla-train"), [
            str(clip), "--out", str(disk / "run"), "--prompt", "a man is skiing", "--model", "tiny",
            "--frames", "4", "--size", "32", "--steps", "2", "--quiet"])
        assert_clean_failure(result, "No space left on device")
        assert snapshot(disk) == before


def test_full_disk_while_exporting_keeps_the_old_folder(world, tmp_path):
    with tmpfs(tmp_path / "disk", 1 << 20) as disk:
        (disk / "eng").mkdir()
        (disk / "eng" / "manifest.json").write_text('{"an": "older export"}')
        before = snapshot(disk)
        result = CliRunner().invoke(cli_main("apla-export"), [
            "--run", str(world.root / "run"), "--out", str(disk / "eng"), "--force", "--backend", "onnx"])
        assert_clean_failure(result, "No space left on device")
        assert snapshot(disk) == before


def test_full_disk_while_generating_leaves_no_file(engine, tmp_path):
    with tmpfs(tmp_path / "disk", 64 << 10) as disk:
        (disk / "keep.txt").write_text("an existing file")
        _fill(disk)
        before = snapshot(disk)
        result = CliRunner().invoke(cli_main("apla-rt"), [
            "generate", "--engine-dir", str(engine), "--prompt", "a man is skiing", "--steps", "1",
            "--out", str(disk / "video.mp4"), "--quiet"])
        assert_clean_failure(result, "No space left on device")
        assert snapshot(disk) == before


def test_read_only_folder_refused_by_all_three(world, engine, clip, tmp_path):
    """Tests run as root, for whom permission bits do not stop writes: a read-only mount does."""
    with tmpfs(tmp_path / "ro", 64 << 10, read_only=True) as ro:
        cases = [
            ("apla-train", [str(clip), "--out", str(ro / "run"), "--prompt", "a man is skiing",
                            "--model", "tiny", "--frames", "4", "--size", "32", "--quiet"], "Read-only file system"),
            ("apla-export", ["--run", str(world.root / "run"), "--out", str(ro / "eng")], "not writable"),
            ("apla-rt", ["generate", "--engine-dir", str(engine), "--prompt", "a man", "--steps", "1",
                         "--out", str(ro / "video.mp4"), "--quiet"], "not writable"),
        ]
        for name, args, fragment in cases:
            assert_clean_failure(CliRunner().invoke(cli_main(name), args), fragment)
        assert not list(ro.iterdir())


# ---------------------------------------------------------------------------------------
# 4. Safe loading


PRODUCT = ("apla_train", "apla_rt", "export", "apla_eval", "benchmarks", "tools")


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call in ``text`` (parentheses balanced)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def test_no_pickle_anywhere_in_the_product_code():
    files = [p for d in PRODUCT for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        if re.search(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|joblib|shelve|marshal)\b", text, re.M):
            problems.append(f"{rel}: imports a pickle-based module")
        if re.search(r"allow_pickle\s*=\s*True", text):
            problems.append(f"{rel}: allow_pickle=True")
        if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", text):
            problems.append(f"{rel}: yaml loading that can build objects (use yaml.safe_load)")
        for args in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                problems.append(f"{rel}: torch.load({args.strip()}) without weights_only=True")
    assert not problems, "\n".join(problems)


def test_checkpoints_and_engine_folders_hold_no_pickle(ref_run, engine):
    """Weights are safetensors, latents .npy (no object arrays), metadata JSON."""
    allowed = {".safetensors", ".json", ".npy", ".onnx", ".jsonl", ".mp4", ".gif", ".txt", ".plan", ".data"}
    for root in (ref_run, engine):
        for path in root.rglob("*"):
            if path.is_file():
                assert path.suffix in allowed, path
                if path.suffix == ".npy":
                    assert np.load(path, allow_pickle=False).dtype != object


# ---------------------------------------------------------------------------------------
# 5. Bad input: one table for the three CLIs


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
    args = ["generate", "--engine-dir", engine, "--steps", "1", "--quiet"]
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
    export_case("export-run-not-given", "Missing option '--run'", "", usage=True),
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
    rt_case("rt-artifact-tampered", "unet.onnx does not match its sha256", engine="{w}/engines/tampered"),
    rt_case("rt-latent-tampered", "start_latent.npy does not match its sha256", engine="{w}/engines/tampered-latent"),
    rt_case("rt-path-dotdot", "points outside the engine folder", engine="{w}/engines/dotdot"),
    rt_case("rt-path-absolute", "is an absolute path", engine="{w}/engines/absolute"),
    rt_case("rt-path-symlink-out", "resolves outside the engine folder", engine="{w}/engines/symlink"),
    rt_case("rt-artifact-missing", "vgt.onnx is listed in the manifest but missing", engine="{w}/engines/noartifact"),
    Case("rt-info-verify-tampered", "apla-rt", ("info", "--engine-dir", "{w}/engines/tampered", "--verify"),
         "unet.onnx does not match its sha256"),
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
    ("apla-rt", ["generate", "--engine-dir", "{w}/engines/tampered", "--prompt", "a man", "--out", "{w}/new.mp4"],
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
