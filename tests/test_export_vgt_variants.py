"""apla-export on the VGT variants: a ``vgt.kind=none`` run exports without a VGT, and a
``vgt.source=true`` run exports a VGT with a ``source`` input that matches PyTorch, its clean
latent travels with the folder and the runtime feeds it."""

from __future__ import annotations

import json

import numpy as np
import torch
from export_helpers import BASE_NETWORKS, LATENT, compare_with_torch, read_manifest

from export import pipeline


def test_vgt_none_run_exports_without_a_vgt(onnx_force_export, novgt_run):
    result, out, _ = onnx_force_export
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    # exported with --no-cache-graphs (conftest's onnx_force_export): the folder layout of
    # an export from before the DeepCache graphs
    assert list(manifest["networks"]) == [n for n in BASE_NETWORKS if n != "vgt"]
    assert manifest["deepcache"] is None
    assert manifest["config"]["vgt"]["kind"] == "none"
    assert not (out / "vgt.onnx").exists()
    validation = json.loads((out / "validation.json").read_text())
    assert "vgt" not in validation["networks"]
    assert all(r["passed"] for r in validation["networks"].values())


def test_vgt_source_run_exports_a_vgt_with_a_source_input(auto_default_out_export, source_run):
    result, cwd = auto_default_out_export
    assert result.exit_code == 0, result.output
    out = cwd / "engines" / source_run.name
    manifest = read_manifest(out)
    assert manifest["vgt_source"] is True
    vgt = manifest["networks"]["vgt"]
    assert [t["name"] for t in vgt["inputs"]] == ["sample", "timestep", "source"]
    assert vgt["inputs"][2]["dims"] == vgt["inputs"][0]["dims"] == ["batch", 4, "frames", LATENT, LATENT]
    # ORT vs PyTorch at a frame count other than the traced one, with the source input
    _, _, torch_vgt, _ = pipeline.load_run(source_run)
    rng = np.random.default_rng(7)
    feeds = {"sample": rng.standard_normal((2, 4, 6, LATENT, LATENT)).astype(np.float32),
             "timestep": np.array([999, 10], dtype=np.int64),
             "source": rng.standard_normal((2, 4, 6, LATENT, LATENT)).astype(np.float32)}
    with torch.no_grad():
        ref = torch_vgt(*(torch.from_numpy(v) for v in feeds.values()))
    compare_with_torch(out, "vgt", feeds, ref, {"batch": 2, "frames": 6})
    # the clean latent that VGT reads travels with the engine folder, and the runtime feeds it
    from rt_run import generate
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample

    assert manifest["source_latent"] == "source_latent.npy"
    source = np.load(out / "source_latent.npy")
    start = np.load(out / "start_latent.npy")
    assert source.shape == start.shape and not np.array_equal(source, start)
    # the run inverted with 1 step: its latent belongs to t=1, where one step is all there is
    assert manifest["start_timestep"] == 1
    result = generate(out, "a man is skiing", steps=1, guidance=3.0)
    _, components, _, _ = pipeline.load_run(source_run)
    text = torch.cat([encode_prompts(components, [""]), encode_prompts(components, ["a man is skiing"])])
    want = ddim_sample(components.unet, torch_vgt, torch.from_numpy(start), text, components.scheduler,
                       1, 3.0, source=torch.from_numpy(source), start_timestep=manifest["start_timestep"])
    assert np.abs(result.latents - want.numpy()).max() < 1e-3
