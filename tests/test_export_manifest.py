"""The engine folder's manifest.json (docs/export.md), from the session's main tiny run exported
once: every documented key with its type, profile ranges, the scheduler and tokenizer round
trips, the start latent, the file hashes and the checkpoint hash."""

from __future__ import annotations

import json
import re

import numpy as np
from export_helpers import LATENT, N_FRAMES, ONNX_DTYPES, PROMPT, SEQ, SIZE, read_manifest, sha256, snapshot

from apla_rt.sampling.schedule import SchedulerConfig


TOP_LEVEL = {"format": str, "format_version": int, "networks": dict, "scheduler": dict,
             "vae_scaling_factor": float, "latent_channels": int, "vae_downsample": int, "tokenizer": dict,
             "start_latent": (str, type(None)), "prompt": str, "checkpoint_sha256": str, "files": dict,
             "versions": dict}
PER_NETWORK = {"onnx": str, "engine": (str, type(None)), "inputs": list, "outputs": list, "profile": dict,
               "tolerance": dict}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def test_manifest_has_every_documented_key_with_its_type(ski_engines, ski_run):
    out, returned, _ = ski_engines
    manifest = read_manifest(out)
    assert manifest == json.loads(json.dumps(returned))  # the file is what export_run returned
    assert manifest["format"] == "apla-engines" and manifest["format_version"] == 1
    for key, kind in TOP_LEVEL.items():
        assert key in manifest, key
        assert isinstance(manifest[key], kind) and not isinstance(manifest[key], bool), key
    assert manifest["prompt"] == PROMPT
    assert (manifest["latent_channels"], manifest["vae_downsample"]) == (4, SIZE // LATENT)
    assert manifest["vae_scaling_factor"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["checkpoint_sha256"])
    assert {"torch", "onnx", "onnxruntime", "opset"} <= set(manifest["versions"])
    assert all(isinstance(v, str) for v in manifest["versions"].values())
    for name, entry in manifest["networks"].items():
        for key, kind in PER_NETWORK.items():
            assert isinstance(entry[key], kind), (name, key)
        assert entry["engine"] is None  # --backend onnx
        assert isinstance(entry["tolerance"]["max_abs"], float) and 0 < entry["tolerance"]["max_abs"] <= 1e-3
        for tensor in entry["inputs"] + entry["outputs"]:
            assert set(tensor) == {"name", "dtype", "dims"} and tensor["dtype"] in ONNX_DTYPES
            assert all(isinstance(d, str) or (_is_int(d) and d >= 1) for d in tensor["dims"]), tensor


def test_profile_ranges_cover_every_named_input_dim(ski_engines):
    from export.trt import profile_shapes

    out, _, _ = ski_engines
    manifest = read_manifest(out)
    for name, entry in manifest["networks"].items():
        named = {d for t in entry["inputs"] for d in t["dims"] if isinstance(d, str)}
        assert named == set(entry["profile"]), name
        for dim, rng in entry["profile"].items():
            assert len(rng) == 3 and all(_is_int(v) for v in rng), (name, dim)
            assert 1 <= rng[0] <= rng[1] <= rng[2], (name, dim, rng)
        profile_shapes(entry["inputs"], entry["profile"])  # what TensorRT's profiles are built from
    unet = manifest["networks"]["unet"]["profile"]
    assert unet["frames"] == [1, N_FRAMES, 24] and unet["batch"] == [1, 2, 2]
    assert unet["height"] == unet["width"] == [LATENT] * 3
    assert manifest["networks"]["vgt"]["profile"]["frames"][2] <= manifest["config"]["vgt"]["max_frames"]


def test_scheduler_loads_and_equals_the_runs(ski_engines, torch_side):
    out, _, _ = ski_engines
    scheduler = SchedulerConfig.from_dict(read_manifest(out)["scheduler"])
    assert scheduler == torch_side[1].scheduler


def test_tokenizer_folder_loads_offline_and_tokenizes_like_the_run(ski_engines, torch_side):
    from transformers import CLIPTokenizer

    out, _, _ = ski_engines
    manifest = read_manifest(out)
    folder = out / manifest["tokenizer"]["dir"]
    assert folder.is_dir()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.model_max_length == manifest["tokenizer"]["model_max_length"] == SEQ
    run_tokenizer = torch_side[1].tokenizer
    for text in (PROMPT, ""):
        assert tokenizer(text, padding="max_length", max_length=SEQ).input_ids == \
            run_tokenizer(text, padding="max_length", max_length=SEQ).input_ids


def test_start_latent_is_the_runs_inverted_latent(ski_engines, ski_run):
    out, _, _ = ski_engines
    manifest = read_manifest(out)
    assert manifest["start_latent"] == "start_latent.npy"
    latent = np.load(out / manifest["start_latent"], allow_pickle=False)
    assert latent.shape == (1, 4, N_FRAMES, LATENT, LATENT) and latent.dtype == np.float32
    assert np.isfinite(latent).all()
    np.testing.assert_array_equal(latent, np.load(ski_run / "start_latent.npy"))


def test_files_hash_every_file_but_the_manifest(ski_engines):
    out, _, _ = ski_engines
    files = read_manifest(out)["files"]
    on_disk = snapshot(out)
    del on_disk["manifest.json"]
    assert files == on_disk
    assert {"validation.json", "start_latent.npy", "unet.onnx"} <= set(files)
    assert any(name.startswith("tokenizer/") for name in files)


def test_checkpoint_hash_is_the_latest_checkpoints(ski_engines, ski_run):
    from apla_train.checkpoint import list_checkpoints

    out, _, _ = ski_engines
    manifest = read_manifest(out)
    (_, first), (_, last) = list_checkpoints(ski_run)
    assert manifest["checkpoint"] == last.name == "step-00000002"
    assert manifest["checkpoint_sha256"] == sha256(last / "model.safetensors")
    assert manifest["checkpoint_sha256"] != sha256(first / "model.safetensors")
