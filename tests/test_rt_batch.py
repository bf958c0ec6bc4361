"""``apla-rt batch`` on the session's exported tiny run: 12 lines from noise (10 steps), 2
actors of 1 thread, batches of 2. The job runs as a subprocess in a network namespace of its
own (tests/netns.py); it is killed with SIGKILL (its process group) after some videos and
rerun: the rerun makes only what is missing, a tampered video again, and every video equals
the library's one-at-a-time result for its seed. Bad lines and another job's folder are
refused before any work (no Ray is started for those). Every process is stopped by its id."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require

require("ray.data")
psutil = require("psutil")

from netns import isolated  # noqa: E402
from serve_helpers import kill_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a man is skiing", "a panda is skiing", "a dog is skiing", "a man"]
LINES = 12
STEPS = 10  # enough that the job is still running when the test kills it after 2 videos


def job_lines() -> list[dict]:
    lines = []
    for i in range(LINES):
        line: dict = {"prompt": PROMPTS[i % 4], "seed": 100 + i, "steps": STEPS}
        if i % 3 == 0:
            line["format"] = "gif"
        if i == 5:
            line["guidance"] = 3
        if i == 7:
            line["negative_prompt"] = "blurry"
        lines.append(line)
    return lines


def batch_cmd(folder: Path, jobs: Path, out: Path) -> list[str]:
    return isolated([sys.executable, "-m", "apla_rt.cli", "batch", "--engine-dir", str(folder),
                     "--jobs", str(jobs), "--out", str(out), "--actors", "2", "--threads", "1",
                     # ONNX Runtime, as the library it is compared with (not the measured choice)
                     "--backend", "ort-cpu",
                     "--max-batch", "2", "--from-noise"])


def index_videos(out: Path) -> list[dict]:
    try:
        return json.loads((out / "index.json").read_text())["videos"]
    except (OSError, ValueError, KeyError):
        return []


def stop_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group started for ``proc`` and then every process left in its
    session (Ray's, by pid): all of them were started by this test."""
    sid = proc.pid
    children = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for _ in range(3):
        kill_all([p for p in children if p.is_running()] + left_in_session(sid))


def left_in_session(sid: int) -> list:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return out


def files(out: Path) -> dict[str, tuple[int, int]]:
    """Final-name videos in ``out``: name -> (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
            if not p.name.startswith(".") and p.name != "index.json"}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch-jobs") / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in job_lines()))
    return path


@pytest.fixture(scope="module")
def resumed(exported, jobs, tmp_path_factory):
    """The job killed after some videos, one of them tampered with, then rerun to the end."""
    _, folder = exported
    out = tmp_path_factory.mktemp("batch") / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = out.parent / "first.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(batch_cmd(folder, jobs, out), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 150
        while len(index_videos(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop_session(proc)
    first_log = log.read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, first_log  # killed, not finished
    assert not left_in_session(proc.pid)
    killed = index_videos(out)
    assert 2 <= len(killed) < LINES, first_log
    on_disk = files(out)
    for entry in killed:  # what the index lists is complete under its final name
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    tampered = killed[0]["file"]
    (out / tampered).write_bytes(b"not a video")
    second = subprocess.run(batch_cmd(folder, jobs, out), capture_output=True, text=True, env=env,
                            timeout=240, cwd=ROOT)
    assert second.returncode == 0, second.stderr
    return {"out": out, "killed": killed, "on_disk": on_disk, "tampered": tampered,
            "second": second.stderr, "folder": folder}


def test_each_video_equals_the_library_one_at_a_time(resumed):
    from apla_rt import Pipeline
    from apla_rt.media.video import psnr, read_video

    out, lines = resumed["out"], job_lines()
    videos = index_videos(out)
    assert sorted(v["line"] for v in videos) == list(range(1, LINES + 1))
    assert len(files(out)) == LINES and not [p for p in out.iterdir() if p.name.startswith(".")]
    with Pipeline.open(resumed["folder"], "ort", threads=1) as pipe:
        other, = pipe.generate(PROMPTS[0], seeds=1, from_noise=True, steps=STEPS)
        for entry in videos:
            line = lines[entry["line"] - 1]
            path = out / entry["file"]
            assert path.suffix == "." + line.get("format", "mp4")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
            assert entry["prompt"] == line["prompt"] and entry["seed"] == line["seed"]
            assert entry["settings"]["steps"] == STEPS and entry["settings"]["from_noise"] is True
            want, = pipe.generate(line["prompt"], seeds=line["seed"], from_noise=True, steps=STEPS,
                                  guidance=line.get("guidance"),
                                  negative_prompt=line.get("negative_prompt", ""))
            assert entry["settings"]["guidance"] == want.settings.guidance
            if path.suffix == ".gif":  # FFmpeg's gif encoder: the same frames, the same bytes
                assert path.read_bytes() == want.encode("gif"), entry
            else:  # H.264 of 32 px noise-like frames (~20 dB): as close to the library's
                # frames as the library's own mp4 of them (measured within 0.1 dB), and far
                # from another seed's video (~4.5 dB). The bytes are not compared: libx264
                # has encoded the same frames to different bytes in one process.
                got = read_video(path)
                assert got.shape == want.frames.shape == (4, 32, 32, 3)
                own = psnr(read_video_bytes(want.encode("mp4"), read_video), want.frames)
                assert own > 15 and psnr(got, want.frames) > own - 0.5, entry
                assert psnr(got, other.frames) < own - 10, entry


def read_video_bytes(data: bytes, read_video) -> np.ndarray:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        path.write_bytes(data)
        return read_video(path)


def test_a_killed_job_resumes_without_redoing_videos(resumed):
    out, killed, on_disk = resumed["out"], resumed["killed"], resumed["on_disk"]
    now = files(out)
    kept = [e["file"] for e in killed if e["file"] != resumed["tampered"]]
    assert kept and all(now[name] == on_disk[name] for name in kept)  # same inode and mtime
    # The rerun's own count: the videos the index listed (less the tampered one) were skipped.
    assert f"{LINES} lines: {len(kept)} video(s) already made, {LINES - len(kept)} to make" \
        in resumed["second"]


def test_a_tampered_video_is_redone(resumed):
    out, name = resumed["out"], resumed["tampered"]
    assert (out / name).read_bytes() != b"not a video"
    entry, = [e for e in index_videos(out) if e["file"] == name]
    assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]


def run_cli(*args: str):
    from click.testing import CliRunner

    from apla_rt.cli import main

    return CliRunner().invoke(main, ["batch", *args])


def test_a_finished_job_reruns_as_nothing_to_do_and_another_job_is_refused(resumed, jobs, tmp_path):
    out, folder = resumed["out"], resumed["folder"]
    before = files(out), (out / "index.json").read_bytes()
    done = run_cli("--engine-dir", str(folder), "--jobs", str(jobs), "--out", str(out), "--from-noise")
    assert done.exit_code == 0, done.output
    assert f"{LINES} video(s) already made, 0 to make" in done.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "a cat is skiing", "seed": 1}) + "\n")
    refused = run_cli("--engine-dir", str(folder), "--jobs", str(other), "--out", str(out))
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "holds the index of another batch job" in refused.stderr and "--force" in refused.stderr
    # The same lines without --from-noise are another job too (other names).
    assert run_cli("--engine-dir", str(folder), "--jobs", str(jobs), "--out", str(out)).exit_code == 2
    assert (files(out), (out / "index.json").read_bytes()) == before


def test_bad_lines_are_one_clean_error_before_any_work(exported, tmp_path):
    _, folder = exported
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"prompt": "a man is skiing", "seed": 1}),
        "",
        json.dumps({"prompt": "a man is skiing"}),  # 3: no seed
        "{not json",  # 4
        json.dumps({"prompt": "a man", "seed": 2, "steps": 0}),  # 5
        json.dumps({"prompt": "a man", "seed": 2, "colour": "red"}),  # 6
        json.dumps({"prompt": "ski " * 100, "seed": 2}),  # 7: too long for the tokenizer
        json.dumps({"prompt": "a man", "seed": 2, "format": "avi"}),  # 8
        json.dumps({"prompt": "a man", "seed": True}),  # 9
        json.dumps(["a man", 1]),  # 10
    ]) + "\n")
    out = tmp_path / "out"
    result = run_cli("--engine-dir", str(folder), "--jobs", str(jobs), "--out", str(out), "--from-noise")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in result.output
    assert "8 bad line(s), nothing was run" in message
    for n in (3, 4, 5, 6, 7):  # the first five named, the others counted
        assert f"line {n}:" in message
    assert "line 1:" not in message and "(and 3 more)" in message
    assert '"seed"' in message and "--steps must be" in message and "'colour'" in message
    assert not out.exists()
