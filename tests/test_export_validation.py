"""apla-export's numbers: each ONNX file run in ONNX Runtime by these tests against the
networks rebuilt in PyTorch (``export.pipeline.load_run``) at frame counts and batch sizes
other than the traced ones, the validation report the export writes, and the smaller shapes
the portable UNet is validated at when full ones would not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import HIDDEN, LATENT, N_FRAMES, NETWORKS, PROMPT, SEQ, SIZE, compare_with_torch, read_manifest


@pytest.mark.parametrize("frames", [2, 7])
@pytest.mark.parametrize("batch", [1, 2])
def test_unet_onnxruntime_matches_pytorch_at_untraced_frame_counts(ski_engines, torch_side, batch, frames):
    out, _, _ = ski_engines
    manifest = read_manifest(out)
    lo, opt, hi = manifest["networks"]["unet"]["profile"]["frames"]
    assert frames != opt == manifest["train_frames"] == N_FRAMES and lo <= frames <= hi  # traced at opt
    _, components, _, _ = torch_side
    rng = np.random.default_rng(10 * batch + frames)
    feeds = {"sample": rng.standard_normal((batch, 4, frames, LATENT, LATENT)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64),
             "encoder_hidden_states": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}
    with torch.no_grad():
        ref = components.unet(*(torch.from_numpy(v) for v in feeds.values()))
    compare_with_torch(out, "unet", feeds, ref,
                       {"batch": batch, "frames": frames, "height": LATENT, "width": LATENT})


@pytest.mark.parametrize("batch, frames", [(1, 1), (2, 3), (1, 9), (2, 16)])
def test_vgt_onnxruntime_matches_pytorch(ski_engines, torch_side, batch, frames):
    out, _, _ = ski_engines
    _, _, vgt, _ = torch_side
    rng = np.random.default_rng(100 + 10 * batch + frames)
    feeds = {"sample": rng.standard_normal((batch, 4, frames, LATENT, LATENT)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64)}
    with torch.no_grad():
        ref = vgt(*(torch.from_numpy(v) for v in feeds.values()))
    compare_with_torch(out, "vgt", feeds, ref, {"batch": batch, "frames": frames})


@pytest.mark.parametrize("frames", [1, 3, 9])
def test_vae_decoder_onnxruntime_matches_pytorch(ski_engines, torch_side, frames):
    out, _, _ = ski_engines
    _, components, _, _ = torch_side
    latent = np.random.default_rng(200 + frames).standard_normal((frames, 4, LATENT, LATENT)).astype(np.float32)
    with torch.no_grad():
        ref = components.codec.decode(torch.from_numpy(latent))
    compare_with_torch(out, "vae_decoder", {"latent": latent}, ref,
                       {"frames": frames, "image_height": SIZE, "image_width": SIZE})


@pytest.mark.parametrize("batch", [1, 2])
def test_text_encoder_onnxruntime_matches_pytorch(ski_engines, torch_side, batch):
    out, _, _ = ski_engines
    _, components, _, _ = torch_side
    ids = components.tokenizer([PROMPT, ""][:batch], padding="max_length", max_length=SEQ,
                               return_tensors="np").input_ids.astype(np.int64)
    with torch.no_grad():
        ref = components.text_encoder(torch.from_numpy(ids))[0]
    compare_with_torch(out, "text_encoder", {"input_ids": ids}, ref, {"batch": batch})


def test_validation_report_passed_at_traced_and_other_shapes(ski_engines):
    out, _, _ = ski_engines
    report = json.loads((out / "validation.json").read_text())
    # + the fused-attention flavours of the UNet graphs
    assert sorted(report["networks"]) == sorted([*NETWORKS, "unet.ort", "unet_feature.ort", "unet_shallow.ort"])
    for name, result in report["networks"].items():
        assert result["passed"] is True, name
        traced = [c for c in result["checks"] if c["traced"]]
        others = [c for c in result["checks"] if not c["traced"]]
        assert traced and others, name
        assert all(c["passed"] and c["finite"] and c["max_abs"] <= result["tolerance"]["max_abs"]
                   for c in result["checks"]), name
        assert all(c["shape"] != traced[0]["shape"] for c in others), name
    unet_frames = {c["shape"]["frames"] for c in report["networks"]["unet"]["checks"]}
    assert len(unet_frames) >= 2


def test_portable_unet_is_validated_at_small_shapes_when_full_ones_would_not_fit(torch_side):
    """At SD's 64x64 latents the decomposed attn1 scores of batch 2 x 24 frames need ~51 GB:
    the portable UNet is then checked at 2-3 frames; the tiny run keeps the full shapes."""
    from export.networks import _small_unet_shapes

    components = torch_side[1]
    assert _small_unet_shapes(components, 8, 1, 24) is None
    small = _small_unet_shapes(components, 64, 1, 24)
    assert small == [{"batch": 1, "frames": 2, "height": 64, "width": 64},
                     {"batch": 2, "frames": 3, "height": 64, "width": 64}]
