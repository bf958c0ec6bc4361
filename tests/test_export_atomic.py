"""apla-export writes its folder atomically: an existing folder is kept without ``--force`` and
replaced with it, failed validation, a crash midway and Ctrl-C leave the previous folder (or
nothing) and no leftovers, and a second concurrent export of one folder is refused."""

from __future__ import annotations

import shutil

import pytest
from export_helpers import (NETWORKS, assert_one_line_error, invoke, leftovers, read_manifest, sha256, snapshot,
                            stderr_lines)

from apla_rt.errors import AplaError, IntegrityError
from export import pipeline


def test_existing_folder_without_force_fails_and_stays_byte_identical(ski_engines, ski_run):
    out, _, _ = ski_engines
    before = snapshot(out)
    result = invoke("--run", ski_run, "--out", out, "--backend", "onnx")
    assert_one_line_error(result, "already exists; pass --force")
    assert snapshot(out) == before


def test_force_replaces_the_existing_folder(onnx_force_export, novgt_run):
    result, out, before = onnx_force_export
    assert result.exit_code == 0, result.output
    assert "vgt.onnx" in before and not (out / "vgt.onnx").exists()
    manifest = read_manifest(out)
    assert manifest["run"] == novgt_run.name
    assert manifest["checkpoint_sha256"] == sha256(novgt_run / "checkpoints" / manifest["checkpoint"]
                                                   / "model.safetensors")
    after = snapshot(out)
    del after["manifest.json"]
    assert manifest["files"] == after
    assert not leftovers(out)


def _failing_validation(fail: str):
    def validate(spec, onnx_path, refs, threads=None):
        ok = spec.name != fail
        check = {"shape": dict(spec.validate_at[0]), "traced": True, "output": spec.outputs[0].name,
                 "max_abs": 0.0 if ok else 1.0, "mean_abs": 0.0, "finite": True, "passed": ok}
        return {"network": spec.name, "tolerance": spec.tolerance, "checks": [check], "passed": ok}
    return validate


def test_failed_validation_keeps_the_previous_folder(ski_engines, ski_run, tmp_path, monkeypatch):
    out = tmp_path / "ski"
    shutil.copytree(ski_engines[0], out)
    before = snapshot(out)
    real_specs = pipeline.network_specs
    # two networks keep it quick: the text encoder passes, the VAE decoder fails
    monkeypatch.setattr(pipeline, "network_specs", lambda *a, **k: [s for s in real_specs(*a, **k)
                                                                    if s.name in ("text_encoder", "vae_decoder")])
    monkeypatch.setattr(pipeline, "compare_network", _failing_validation("vae_decoder"))
    with pytest.raises(IntegrityError, match=r"validation failed for vae_decoder \("):
        pipeline.export_run(ski_run, out, backend="onnx", force=True, log=lambda _m: None)
    assert snapshot(out) == before
    assert not leftovers(out)


def test_exception_midway_keeps_the_previous_folder(ski_engines, ski_run, tmp_path, monkeypatch):
    out = tmp_path / "ski"
    shutil.copytree(ski_engines[0], out)
    before = snapshot(out)
    real, calls = pipeline.export_onnx, []

    def export_then_fail(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:  # the first network's ONNX is already in the new folder
            raise RuntimeError("simulated exporter crash")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline, "export_onnx", export_then_fail)
    with pytest.raises(RuntimeError, match="simulated exporter crash"):
        pipeline.export_run(ski_run, out, backend="onnx", force=True, log=lambda _m: None)
    assert calls == [n for n in NETWORKS if not n.startswith("unet")][:2]  # the UNet graphs last
    assert snapshot(out) == before
    assert not leftovers(out)


def test_interrupted_export_writes_nothing(ski_run, tmp_path, monkeypatch):
    out = tmp_path / "new" / "ski"

    def interrupt(spec, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_onnx", interrupt)
    result = invoke("--run", ski_run, "--out", out, "--backend", "onnx")
    assert result.exit_code == 130
    assert stderr_lines(result) == ["interrupted: no engine folder was changed"]
    assert not out.exists() and not leftovers(out)


def test_concurrent_export_to_the_same_folder_refuses(ski_run, tmp_path):
    out = tmp_path / "ski"
    with pipeline.export_lock(out):
        result = invoke("--run", ski_run, "--out", out, "--backend", "onnx")
    assert_one_line_error(result, f"another apla-export is writing {out}")
    assert not out.exists() and not leftovers(out)
    with pipeline.export_lock(out):  # released: the next export may take it
        pass
    with pipeline.export_lock(out), pytest.raises(AplaError, match="another apla-export"):
        with pipeline.export_lock(out):
            pass
