"""Reliability, atomic outputs (docs/reliability.md section 3): write failures (a failing
writer, a full disk, a read-only folder) leave no half-written file and change no existing
one, for training, export and generation; two exports to one folder: the second refuses."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from reliability_helpers import (STEPS, _copy_run, assert_clean_failure, cli_main, folder_hashes, snapshot,
                                 tiny_config)

from apla_train import checkpoint as ckpt


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_file_and_folder_survive_a_failing_write(tmp_path):
    from apla_rt.folder import atomic
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
    import apla_rt.media.video as video

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
    from apla_rt.folder.manifest import Manifest

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
