"""apla_rt.folder.manifest on the fake engine folder: accessors, refused folders (missing, unknown
versions, paths or symlinks leaving the folder, tampered, missing or unhashed artifacts,
schema errors), hashing each file once per open, and feeds checked against the profiles."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from rt_fakes import C, FRAMES, HIDDEN, LAT, PATCH, SEQ, edit_manifest

from apla_rt.folder import manifest as M
from apla_rt.errors import InputError, IntegrityError
from apla_rt.folder.manifest import Manifest
from rt_run import generate
from apla_rt.sampling.schedule import SchedulerConfig


def test_manifest_accessors(fake_engine):
    m = Manifest.open(fake_engine)
    assert set(m.networks) == {"text_encoder", "unet", "vgt", "vae_decoder", "vae_encoder"}
    unet = m.network("unet")
    assert unet.input_names == ("sample", "timestep", "encoder_hidden_states")
    assert unet.input("sample").dims == ("batch", C, "frames", "height", "width")
    assert unet.input("timestep").dtype == np.int64
    assert unet.dim_range("frames") == FRAMES and unet.onnx == fake_engine / "unet.onnx"
    assert m.scheduler == SchedulerConfig()
    assert m.vae_scaling_factor == 0.5 and m.vae_downsample == PATCH and m.latent_channels == C
    assert m.tokenizer_dir == fake_engine / "tokenizer" and m.model_max_length == SEQ
    assert m.start_latent_shape() == (1, C, 4, LAT, LAT)
    assert m.frame_range() == FRAMES and m.latent_size() == (LAT, LAT)
    assert m.prompt == "a man is skiing" and m.fps == 6.0 and m.versions == {"apla": "test"}
    z = m.load_start_latent()
    assert z.dtype == np.float32 and z.shape == (1, C, 4, LAT, LAT)
    m.verify()


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Manifest.open(tmp_path / "nope")
    with pytest.raises(InputError, match="no manifest.json"):
        Manifest.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not readable JSON"):
        Manifest.open(tmp_path)


def test_unknown_format_version_is_refused(engine_copy):
    edit_manifest(engine_copy, lambda d: d.update(format_version=2))
    with pytest.raises(IntegrityError, match="format_version 2; this apla-rt reads format_version 1"):
        Manifest.open(engine_copy)
    edit_manifest(engine_copy, lambda d: d.update(format_version=1, format="something-else"))
    with pytest.raises(IntegrityError, match="not an apla engine manifest"):
        Manifest.open(engine_copy)


@pytest.mark.parametrize("bad", ["../unet.onnx", "/etc/passwd", "sub/../../x.onnx", "C:\\x.onnx"])
def test_paths_escaping_the_folder_are_refused(engine_copy, bad):
    edit_manifest(engine_copy, lambda d: d["networks"]["unet"].update(onnx=bad))
    with pytest.raises(IntegrityError, match="absolute|outside"):
        Manifest.open(engine_copy)


def test_symlink_escaping_the_folder_is_refused(engine_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(engine_copy / "unet.onnx", outside)
    (engine_copy / "unet.onnx").unlink()
    os.symlink(outside, engine_copy / "unet.onnx")
    with pytest.raises(IntegrityError, match="resolves outside the engine folder"):
        Manifest.open(engine_copy)


def test_tampered_and_missing_artifacts(engine_copy):
    data = bytearray((engine_copy / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (engine_copy / "unet.onnx").write_bytes(bytes(data))
    m = Manifest.open(engine_copy)  # opening reads no artifact
    m.verify(["text_encoder.onnx"])
    with pytest.raises(IntegrityError, match=r"^unet\.onnx does not match its sha256"):
        m.verify()
    with pytest.raises(IntegrityError, match="unet.onnx does not match"):
        generate(engine_copy, "a man is skiing", steps=2)
    (engine_copy / "vgt.onnx").unlink()
    with pytest.raises(IntegrityError, match="vgt.onnx is listed in the manifest but missing"):
        Manifest.open(engine_copy).verify(["vgt.onnx"])


def test_artifact_without_hash_and_bad_hash_are_refused(engine_copy):
    edit_manifest(engine_copy, lambda d: d["files"].pop("vgt.onnx"))
    with pytest.raises(IntegrityError, match="vgt.onnx is used but has no sha256"):
        Manifest.open(engine_copy)
    edit_manifest(engine_copy, lambda d: d["files"].update({"vgt.onnx": "abc"}))
    with pytest.raises(IntegrityError, match="not a lowercase hex sha256"):
        Manifest.open(engine_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["networks"]["unet"]["inputs"][0].update(name="latents"), "the contract says"),
    (lambda d: d["networks"]["unet"]["profile"].update(frames=[4, 2, 6]), "min <= opt <= max"),
    (lambda d: d["networks"]["unet"]["profile"].pop("frames"), "no profile range"),
    (lambda d: d["networks"]["unet"]["inputs"][0].update(dtype="float64"), "dtype"),
    (lambda d: d["networks"].pop("text_encoder"), "missing"),
    (lambda d: d["networks"].update(refiner=d["networks"]["unet"]), "unknown networks"),
    (lambda d: d["scheduler"].update(prediction_type="v_prediction"), "prediction_type"),
    (lambda d: d.update(vae_scaling_factor=-1), "vae_scaling_factor"),
    (lambda d: d.pop("tokenizer"), "tokenizer"),
])
def test_schema_errors(engine_copy, edit, message):
    edit_manifest(engine_copy, edit)
    with pytest.raises(IntegrityError, match=message) as info:
        Manifest.open(engine_copy)
    assert "\n" not in str(info.value)


def test_each_file_is_hashed_once_per_open(fake_engine, monkeypatch):
    calls: list[str] = []
    real = M.sha256_file
    monkeypatch.setattr(M, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    m = Manifest.open(fake_engine)
    m.verify(["unet.onnx"])
    m.verify()
    m.verify(["unet.onnx", "tokenizer"])
    assert sorted(calls) == sorted(Path(f).name for f in m.files)
    Manifest.open(fake_engine).verify(["unet.onnx"])
    assert calls.count("unet.onnx") == 2


def test_read_verified_returns_the_checked_bytes(engine_copy, monkeypatch):
    """What a TensorRT runner loads: the file read once, its sha256 checked on those bytes."""
    m = Manifest.open(engine_copy)
    calls: list[str] = []
    monkeypatch.setattr(M, "sha256_file", lambda p: calls.append(Path(p).name))
    assert m.read_verified(engine_copy / "vgt.onnx") == (engine_copy / "vgt.onnx").read_bytes()
    m.verify(["vgt.onnx"])
    assert calls == []  # counted as verified: not hashed again
    data = bytearray((engine_copy / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (engine_copy / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"^unet\.onnx does not match its sha256"):
        m.read_verified(engine_copy / "unet.onnx")
    (engine_copy / "notes.txt").write_text("not listed")
    with pytest.raises(IntegrityError, match="notes.txt is used but has no sha256"):
        m.read_verified(engine_copy / "notes.txt")


def test_check_feeds_against_profile(fake_engine):
    unet = Manifest.open(fake_engine).network("unet")
    ok = {"sample": np.zeros((2, C, 4, LAT, LAT), np.float32), "timestep": np.zeros(2, np.int64),
          "encoder_hidden_states": np.zeros((2, SEQ, HIDDEN), np.float32)}
    assert unet.check_feeds(ok) == {"batch": 2, "frames": 4, "height": LAT, "width": LAT}
    bad = dict(ok, sample=np.zeros((2, C, 9, LAT, LAT), np.float32))
    with pytest.raises(InputError, match=r"frames = 9 is outside the engines' range 1\.\.6"):
        unet.check_feeds(bad)
    with pytest.raises(InputError, match="must be int64"):
        unet.check_feeds(dict(ok, timestep=np.zeros(2, np.int32)))
    with pytest.raises(InputError, match="dim 'batch' is 2 in one input and 1"):
        unet.check_feeds(dict(ok, timestep=np.zeros(1, np.int64)))
    with pytest.raises(InputError, match="shape"):
        unet.check_feeds(dict(ok, sample=np.zeros((2, 3, 4, LAT, LAT), np.float32)))
