"""Training with several processes (``torchrun``, gloo on the CPU): killed with SIGKILL after
a checkpoint and resumed, the run ends bit-identical to an uninterrupted one, because each
process's RNG states are saved with the checkpoint and restored to that process.

The same code runs under ``accelerate launch`` on GPUs (NCCL); that could not be run here.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from apla_train import checkpoint as ckpt

pytestmark = pytest.mark.slow

STEPS = 20
ARGS = ["--prompt", "a man is skiing", "--model", "tiny", "--frames", "4", "--size", "32",
        "--steps", str(STEPS), "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=20",
        "--set", "loss.adv_start=3", "--set", "sample.steps=2", "--set", "sample.inversion_steps=2",
        "--quiet", "--threads", "1"]


def torchrun(*args: str) -> list[str]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend for multi-process CPU training")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "-m", "apla_train.cli", *args]


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def run_to_end(cmd: list[str], log: Path) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def reference(skiing, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mp-reference") / "run"
    run_to_end(torchrun(str(skiing), "--out", str(run), *ARGS), run.parent / "log.txt")
    return run


def test_checkpoints_hold_every_process_rng(reference):
    path = ckpt.checkpoint_dir(reference, STEPS)
    assert json.loads((path / "state.json").read_text())["processes"] == 2
    rng = load_file(str(path / "rng.safetensors"))
    assert set(rng) == {"torch_cpu", "data", "torch_cpu.rank1", "data.rank1"}
    assert not torch.equal(rng["data"], rng["data.rank1"])  # two processes, two streams


def test_sigkill_then_resume_is_bit_identical(reference, skiing, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "killed.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(str(skiing), "--out", str(run), *ARGS), stdout=out,
                                stderr=subprocess.STDOUT)
    family: list[psutil.Process] = []
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if ckpt.checkpoint_dir(run, 4).is_dir():  # mid-run: a checkpoint, steps still to go
                family = process_tree(proc.pid)
                break
            time.sleep(0.005)
    finally:  # the workers run in sessions of their own: kill them and the launcher at once
        if not family and proc.poll() is None:  # past the deadline or failed: clean up all the same
            family = process_tree(proc.pid)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        gone = psutil.wait_procs(family, timeout=60)[0]  # reaps the launcher too
    launcher = [p.returncode for p in gone if p.pid == proc.pid]  # the workers' status is its
    assert len(family) >= 3 and len(gone) == len(family) and launcher == [-signal.SIGKILL], \
        log.read_text()[-3000:]
    last = ckpt.latest_checkpoint(run)
    assert last is not None and ckpt.read_state(last)["step"] < STEPS

    run_to_end(torchrun("--out", str(run), "--resume"), tmp_path / "resumed.txt")
    assert f"resumed from checkpoints/{last.name}" in (tmp_path / "resumed.txt").read_text()
    for name in ("model.safetensors", "disc.safetensors", "optim.safetensors", "rng.safetensors"):
        want = load_file(str(ckpt.checkpoint_dir(reference, STEPS) / name))
        got = load_file(str(ckpt.checkpoint_dir(run, STEPS) / name))
        assert set(got) == set(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key}"
    optim = [json.loads((ckpt.checkpoint_dir(r, STEPS) / "optim.json").read_text()) for r in (reference, run)]
    assert optim[0] == optim[1]
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
