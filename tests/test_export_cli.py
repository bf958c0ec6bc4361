"""The apla-export command line: ``--backend onnx|auto|trt`` and what each prints, the default
``--out``, bad input as one ``error:`` line that writes nothing (also in a real process), and
(marker ``tensorrt``) ``--backend trt --fp16`` building checked engines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import assert_one_line_error, invoke, leftovers, read_manifest, sha256, snapshot, stderr_lines

from export.trt import trt_available


# --------------------------------------------------------------------------- CLI: backends, --out


def test_cli_backend_onnx_builds_no_engines_and_prints_no_tensorrt_line(onnx_force_export):
    result, out, _ = onnx_force_export
    assert result.exit_code == 0, result.output
    assert "TensorRT" not in result.output and "engine" not in result.stderr.replace("engine folder", "")
    assert stderr_lines(result)[-1] == f"engine folder written to {out}"
    assert not list(out.glob("*.plan")) and not (out / "timing.cache").exists()
    assert all(e["engine"] is None for e in read_manifest(out)["networks"].values())


def test_cli_backend_auto_without_tensorrt_says_so_in_one_line(auto_default_out_export):
    ok, reason = trt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are available here: --backend auto builds engines")
    result, _ = auto_default_out_export
    assert result.exit_code == 0, result.output
    (line,) = [l for l in stderr_lines(result) if "TensorRT" in l]
    assert line.startswith("TensorRT engines were not built: ") and reason in line
    assert "Traceback" not in result.output


def test_cli_default_out_is_engines_slash_run_name(auto_default_out_export, source_run):
    result, cwd = auto_default_out_export
    assert result.exit_code == 0, result.output
    assert [p.name for p in (cwd / "engines").iterdir() if not p.name.startswith(".")] == [source_run.name]
    manifest = read_manifest(cwd / "engines" / source_run.name)
    assert manifest["name"] == manifest["run"] == source_run.name
    assert stderr_lines(result)[-1] == f"engine folder written to {Path('engines') / source_run.name}"


def test_cli_backend_trt_without_tensorrt_fails_naming_why(ski_run, tmp_path):
    ok, reason = trt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are available here")
    out = tmp_path / "engines"
    result = invoke("--run", ski_run, "--out", out, "--backend", "trt", "--fp16")
    line = assert_one_line_error(result, reason)
    assert line == f"error: cannot build TensorRT engines: {reason}"
    assert not out.exists() and not leftovers(out)


# --------------------------------------------------------------------------- CLI: bad input


def _not_a_run(root: Path, _run: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _no_checkpoint(root: Path, run: Path) -> Path:
    (root / "fresh").mkdir()
    shutil.copy(run / "config.json", root / "fresh" / "config.json")
    return root / "fresh"


def _bad_config(root: Path, _run: Path) -> Path:
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"prompt": ')
    return root / "broken"


BAD_INPUT = [
    # (id, make the --run folder, extra args, text the one error line must contain)
    ("missing-run", lambda root, run: root / "nowhere", [], "is not a training run folder"),
    ("not-a-run", _not_a_run, [], "is not a training run folder"),
    ("no-checkpoint", _no_checkpoint, [], "has no complete checkpoint"),
    ("damaged-config", _bad_config, [], "cannot read config.json"),
    ("frames-min-above-opt", lambda root, run: run, ["--frames-min", "5", "--frames-opt", "2"],
     "frame profile must satisfy 1 <= min <= opt <= max (got 5, 2, 24)"),
    ("frames-max-above-vgt", lambda root, run: run, ["--frames-max", "100"], "exceeds the VGT's 64 frame"),
    ("frames-zero", lambda root, run: run, ["--frames-min", "0"], "--frames-min must be between 1 and 1024"),
    ("threads-zero", lambda root, run: run, ["--threads", "0"], "--threads must be between 1 and 1024"),
]


@pytest.mark.parametrize("make_run, extra, needle", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_cli_bad_input_is_a_one_line_error_and_writes_nothing(ski_run, tmp_path, make_run, extra, needle):
    run = make_run(tmp_path, ski_run)
    before = snapshot(ski_run)
    out = tmp_path / "out" / "engines"
    result = invoke("--run", run, "--out", out, "--backend", "onnx", *extra)
    assert_one_line_error(result, needle)
    assert not out.exists()
    assert snapshot(ski_run) == before


def test_out_equal_to_the_run_is_refused_even_with_force(ski_run):
    before = snapshot(ski_run)
    assert_one_line_error(invoke("--run", ski_run, "--out", ski_run, "--backend", "onnx", "--force"),
                          "would replace the run folder")
    assert_one_line_error(invoke("--run", ski_run, "--out", ski_run.parent, "--backend", "onnx", "--force"),
                          "would replace the run folder")
    assert snapshot(ski_run) == before


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("apla-export")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "export.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([*cmd, "--run", "runs/nowhere", "--backend", "onnx"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --run runs/nowhere is not a training run folder "
                                                "(no config.json)"]
    assert proc.stdout == "" and not (tmp_path / "engines" / "nowhere").exists()


# --------------------------------------------------------------------------- TensorRT (GPU only)


@pytest.mark.tensorrt
def test_backend_trt_fp16_builds_checked_engines(ski_run, tmp_path):
    ok, reason = trt_available()
    if not ok:
        pytest.skip(reason)
    out = tmp_path / "engines"
    result = invoke("--run", ski_run, "--out", out, "--backend", "trt", "--fp16")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert (out / "timing.cache").is_file() and "tensorrt" in manifest["versions"]
    for name, entry in manifest["networks"].items():
        assert entry["engine"] == f"{name}.plan" and (out / entry["engine"]).is_file()
        assert manifest["files"][entry["engine"]] == sha256(out / entry["engine"])
        assert entry["trt_check"]["passed"] is True and entry["trt_status"] == "ok"
        assert entry["trt_check"]["reference"] == entry.get("onnx_ort", entry["onnx"])  # fused where written
        assert set(entry["trt_check"]["per_shape"]) == {"min", "opt"}
    assert manifest["networks"]["unet"]["onnx_fp16"] == "unet.fp16.onnx"
