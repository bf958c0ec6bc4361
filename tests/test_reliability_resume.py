"""Reliability, resume (docs/reliability.md section 1): a real ``apla-train`` process killed
with SIGKILL at a random step and continued with ``--resume`` ends bit-identical to the
session's uninterrupted reference run; only complete checkpoints are visible, leftovers are
cleaned, old ones pruned."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import RUN_ARGS, STEPS, _checkpoint_tensors, cli_command

from apla_train import checkpoint as ckpt


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
