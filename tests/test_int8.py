"""int8 checked before it is trusted (``apla-export --int8``, ``export/int8.py``;
``--precision int8``, ``apla_rt.folder.int8``) on the session's exported tiny run.

The tiny test model is barely trained and samples 2 DDIM steps, so int8 moves its video far
(about 23 dB PSNR against fp32): under the default budget its UNet never passes, and the
accuracy control that could revert layers to float takes far longer than a test may (each
candidate is an OpenVINO compile). So the passing folder is made with a budget of
``TEST_MAX_DROP_DB`` (recorded in the folder and shown by the runtime), and a failed record
is made by the real path under a tiny time limit; the fidelity under the default budget on a
trained model is a benchmark (docs/benchmarks.md, "int8 under accuracy control").
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require

require("openvino")
require("nncf")

from apla_rt import Pipeline  # noqa: E402
from apla_rt.backends import precision as cpu_precision  # noqa: E402
from apla_rt.backends.placement import int8_available, place  # noqa: E402
from apla_rt.cli import main as rt_cli  # noqa: E402
from apla_rt.errors import BackendUnavailable, IntegrityError, OutputExistsError  # noqa: E402
from apla_rt.folder.int8 import MAX_DROP_DB, PSNR_CEILING_DB, fidelity  # noqa: E402
from apla_rt.folder.manifest import Manifest  # noqa: E402
from apla_rt.media.video import psnr  # noqa: E402
from export import int8 as export_int8  # noqa: E402
from export.cli import main as export_cli  # noqa: E402

# The test's budget: int8 within 15 dB PSNR of the fp32 video (measured 23 dB on this model).
TEST_MAX_DROP_DB = 45.0


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, needle: str) -> str:
    """A non-zero exit and exactly one ``error:`` line naming ``needle``, no traceback."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), lines
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(cpu_precision.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "int8-cache"))


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """A copy of the exported folder given int8 through the CLI: the UNet (``--int8-networks
    unet``: the feature graph that serves its calls in this folder) under the test's budget, the VAE decoder under a budget of 0 dB with a time limit that stops accuracy
    control at once (its record misses). Returns (folder, the folder before, CLI result)."""
    root = tmp_path_factory.mktemp("int8")
    folder = root / "engine"
    shutil.copytree(exported[1], folder)
    before = snapshot(folder)
    result = invoke(export_cli, "--int8", "--engine-dir", folder, "--int8-networks", "unet",
                    "--int8-max-drop", TEST_MAX_DROP_DB, "--threads", 2)
    assert result.exit_code == 0, result.output
    section = export_int8.add_int8(folder, export_int8.Int8Options(  # stopped at its first check
        networks=("vae_decoder",), max_drop_db=0.0, minutes=1e-6, threads=2), log=lambda m: None)
    assert set(section) == {"unet_feature", "vae_decoder"}  # unet: the graph serving it
    return folder, before, result


def _record(folder: Path, name: str) -> dict:
    return json.loads((folder / "manifest.json").read_text())["int8"][name]


# --------------------------------------------------------------------------- export


def test_the_manifest_records_the_checks(quantized, exported):
    folder, before, result = quantized
    unet = _record(folder, "unet_feature")
    fid = unet["fidelity"]
    assert fid["passed"] is True and fid["max_drop_db"] == TEST_MAX_DROP_DB
    assert len(fid["psnr_db"]) == 3 and fid["worst_db"] == min(fid["psnr_db"]) < PSNR_CEILING_DB
    assert fid["drop_db"] == pytest.approx(PSNR_CEILING_DB - fid["worst_db"], abs=1e-3)
    calib = unet["calibration"]
    # every step of the three calibration videos, each a guided call: 3 x steps
    assert calib["items"] == 3 * calib["steps"] and calib["every_step"]
    assert {c["name"] for c in calib["cases"]}.isdisjoint(c["name"] for c in unet["validation"]["cases"])
    assert unet["versions"]["nncf"] and unet["versions"]["openvino"] and unet["quantizers"] > 0
    assert unet["accuracy_control"]["finished"] is True
    manifest = Manifest.open(folder)
    manifest.verify()
    assert manifest.files["unet_feature.int8.xml"] == hashlib.sha256((folder / "unet_feature.int8.xml").read_bytes()).hexdigest()
    assert unet["source_sha256"] == manifest.files["unet_feature.onnx"]
    lines = [line for line in result.stderr.splitlines() if line.startswith("unet_feature:")]
    assert lines == [f"unet_feature: int8 {fid['worst_db']:.2f} dB PSNR vs fp32 at worst (drop {fid['drop_db']:.2f} "
                     f"dB, budget {TEST_MAX_DROP_DB:g}): passed"]


def test_a_missed_budget_is_recorded_with_the_miss(quantized):
    folder, _, _ = quantized
    vae = _record(folder, "vae_decoder")
    assert vae["fidelity"]["passed"] is False and vae["fidelity"]["max_drop_db"] == 0.0
    assert vae["accuracy_control"]["finished"] is False and vae["accuracy_control"]["validations"] == 0
    ok, why = int8_available(Manifest.open(folder), "vae_decoder")
    assert not ok and "did not pass" in why and f"missed by {vae['fidelity']['drop_db']:.2f} dB" in why


def test_an_existing_folder_gets_int8_atomically(quantized):
    folder, before, _ = quantized
    after = snapshot(folder)
    added = set(after) - set(before)
    assert added == {"unet_feature.int8.xml", "unet_feature.int8.bin", "vae_decoder.int8.xml", "vae_decoder.int8.bin"}
    assert {k for k in before if before[k] != after[k]} == {"manifest.json"}
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".") and "lock" not in p.name]


def test_a_failed_add_leaves_the_folder_as_it_was(quantized, tmp_path, monkeypatch):
    folder = tmp_path / "engine"
    shutil.copytree(quantized[0], folder)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(export_int8, "quantize_network", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_int8.add_int8(folder, export_int8.Int8Options(networks=("unet",), force=True), log=lambda m: None)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".engine.lock", "engine"]


# --------------------------------------------------------------------------- runtime


def test_int8_runs_within_its_recorded_fidelity(quantized):
    folder, _, _ = quantized
    rec = _record(folder, "unet_feature")
    case = export_int8.VALIDATION[0]  # noise seed 1, the training prompt
    settings = dict(seeds=case.seed, from_noise=case.from_noise, steps=rec["validation"]["steps"])
    with Pipeline.open(folder, "openvino", 2, precision="int8") as pipe:
        assert pipe.placement.choice("unet_feature").precision == "int8"
        assert pipe.placement.choice("vae_decoder").precision == "fp32"  # its check missed
        assert any("int8 for vae_decoder" in n and "it runs in fp32" in n for n in pipe.placement.notes)
        assert pipe.engine.pool.runner("unet").backend == "openvino-cpu-int8"
        got, = pipe.generate(pipe.manifest.prompt, **settings)
    with Pipeline.open(folder, "ort-cpu", 2, precision="fp32") as pipe:
        want, = pipe.generate(pipe.manifest.prompt, **settings)
    measured = min(psnr(got.frames, want.frames), PSNR_CEILING_DB)
    assert measured == pytest.approx(rec["fidelity"]["psnr_db"][0], abs=0.5)
    assert measured >= rec["fidelity"]["worst_db"] - 0.5


def test_generate_says_int8_ran(quantized, tmp_path):
    folder, _, _ = quantized
    result = invoke(rt_cli, "generate", "--engine-dir", folder, "--prompt", "a man is skiing",
                    "--out", tmp_path / "v.mp4", "--precision", "int8", "--threads", 2)
    assert result.exit_code == 0, result.output
    assert "int8 (unet_feature)" in result.stderr and (tmp_path / "v.mp4").is_file()
    info = invoke(rt_cli, "info", "--engine-dir", folder)
    assert "int8: unet_feature: unet_feature.int8.xml, its int8 check passed" in info.output
    assert "int8: vae_decoder: vae_decoder.int8.xml, its int8 check did not pass" in info.output


def test_a_tampered_int8_file_is_refused(quantized, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(quantized[0], folder)
    data = bytearray((folder / "unet_feature.int8.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "unet_feature.int8.bin").write_bytes(bytes(data))
    result = invoke(rt_cli, "generate", "--engine-dir", folder, "--prompt", "a man is skiing",
                    "--out", tmp_path / "v.mp4", "--precision", "int8")
    one_line_error(result, "unet_feature.int8.bin does not match its sha256")
    assert not (tmp_path / "v.mp4").exists()


def _edit(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_a_failed_unet_check_refuses_int8_in_one_line(quantized, tmp_path):
    """The same model recorded under the default budget: its check missed, so int8 is refused."""
    folder = tmp_path / "engine"
    shutil.copytree(quantized[0], folder)
    drop = _record(folder, "unet_feature")["fidelity"]["drop_db"]
    assert drop > MAX_DROP_DB  # this model's int8 misses the default budget

    def missed(data):
        data["int8"]["unet_feature"]["fidelity"].update(max_drop_db=MAX_DROP_DB, passed=False)

    _edit(folder, missed)
    result = invoke(rt_cli, "generate", "--engine-dir", folder, "--prompt", "a man is skiing",
                    "--out", tmp_path / "v.mp4", "--precision", "int8")
    line = one_line_error(result, "--precision int8: unet_feature: its int8 check did not pass")
    assert f"missed by {drop - MAX_DROP_DB:.2f} dB" in line and not (tmp_path / "v.mp4").exists()
    with pytest.raises(BackendUnavailable, match="int8 never runs unchecked"):
        place(Manifest.open(folder), ("unet_feature",), "openvino", "int8")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["int8"]["unet_feature"]["fidelity"].update(passed=True, max_drop_db=1.0), "inconsistent"),
    (lambda d: d["files"].pop("unet_feature.int8.bin"), "unet_feature.int8.bin has no sha256"),
    (lambda d: d["int8"]["unet_feature"].update(source_sha256="0" * 64), "quantized from another unet_feature.onnx"),
    (lambda d: d["int8"]["unet_feature"].update(model="../unet.int8.xml"), "outside the engine folder"),
    (lambda d: d["int8"].update(vgt=d["int8"]["unet_feature"]), "only unet, unet_feature"),
], ids=["passed-but-missed", "unlisted-file", "stale-source", "escape", "vgt"])
def test_a_bad_int8_record_is_refused_at_open(quantized, tmp_path, edit, message):
    folder = tmp_path / "engine"
    shutil.copytree(quantized[0], folder)
    _edit(folder, edit)
    with pytest.raises(IntegrityError, match=message):
        Manifest.open(folder)


def test_int8_without_a_model_is_refused(exported, tmp_path):
    out = tmp_path / "v.mp4"
    for extra, message in ((["--backend", "openvino"], "the engine folder has no int8 model for unet"),
                           (["--backend", "ort-cpu"], "--precision int8 runs on --backend openvino only")):
        result = invoke(rt_cli, "generate", "--engine-dir", exported[1], "--prompt", "a man is skiing",
                        "--out", out, "--precision", "int8", *extra)
        one_line_error(result, message)
    assert not out.exists()
    ok, why = int8_available(Manifest.open(exported[1]), "unet")
    assert not ok and "apla-export --int8" in why


def test_fidelity_rule():
    rec = fidelity([61.0, 50.5, float("inf")])
    assert rec["psnr_db"] == [60.0, 50.5, 60.0] and rec["worst_db"] == 50.5
    assert rec["drop_db"] == pytest.approx(9.5) and rec["passed"] is (9.5 <= MAX_DROP_DB)
    assert fidelity([47.0])["passed"] is (PSNR_CEILING_DB - 47.0 <= MAX_DROP_DB)


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("args, message", [
    (["--engine-dir", "{engine}"], "pass --int8 with it"),
    (["--int8", "--engine-dir", "{engine}", "--run", "{engine}"], "does not take --run or --out"),
    (["--int8"], "give --run DIR"),
    (["--int8-steps", "3", "--run", "{engine}"], "--int8-steps: only with --int8"),
    (["--int8", "--engine-dir", "{engine}", "--int8-steps", "0"], "--int8-steps must be an integer"),
    (["--int8", "--engine-dir", "{engine}", "--int8-max-drop", "-1"], "--int8-max-drop must be a number >= 0"),
    (["--int8", "--engine-dir", "{engine}", "--int8-max-drop", "nan"], "--int8-max-drop must be"),
    (["--int8", "--engine-dir", "{engine}", "--int8-minutes", "0"], "--int8-minutes must be a positive"),
    (["--int8", "--engine-dir", "{engine}", "--int8-networks", "vgt"], "--int8-networks takes unet"),
    (["--int8", "--engine-dir", "{engine}", "--int8-networks", ","], "--int8-networks takes unet"),
    (["--int8", "--engine-dir", "{engine}", "--fp16"], "--fp16 shape a new export"),
    (["--int8", "--engine-dir", "{missing}"], "does not exist"),
    (["--int8", "--engine-dir", "{engine}", "--int8-networks", "unet"], "already has int8 models for unet"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_int8_options_are_one_line(quantized, tmp_path, args, message):
    folder = quantized[0]
    before = snapshot(folder)
    filled = [a.format(engine=folder, missing=tmp_path / "none") for a in args]
    one_line_error(invoke(export_cli, *filled), message)
    assert snapshot(folder) == before


def test_int8_replaces_only_with_force(quantized):
    with pytest.raises(OutputExistsError, match="pass --force"):
        export_int8.add_int8(quantized[0], export_int8.Int8Options(networks=("vae_decoder",)))
