"""Reliability, numerical faults (docs/reliability.md section 2): a non-finite loss or gradient
stops training with one line naming the step and the last good checkpoint (left intact);
``--skip-nonfinite`` skips such steps and counts them."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from reliability_helpers import _checkpoint_tensors, assert_clean_failure, cli_main, folder_hashes, tiny_config

from apla_train import checkpoint as ckpt


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
