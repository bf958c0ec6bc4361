"""VGT: zero at init, trainable, frame-count agnostic, causal masks, ONNX with dynamic frames.

Parameter count with the defaults (d=256, 8 heads, 2+2 blocks, p=4, 64x64 latents, 4 channels):
VGT-Pure 3,406,912; VGT-Hyper 4,048,708 (the four transformer blocks alone are 3.16 M).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import require

from apla_rt.errors import ConfigError
from apla_train.config import VGTConfig
from apla_train.vgt import VGT, build_vgt

torch.set_num_threads(2)

C, S = 4, 8  # latent channels, latent size
VARIANTS = [(k, m) for k in ("pure", "hyper") for m in ("causal", "none")]


def tiny_cfg(kind: Any = "hyper", mask: Any = "causal", **kw: Any) -> VGTConfig:
    base = VGTConfig(kind="hyper", mask="causal", patch=2, dim=32, heads=4, spatial_layers=1,
                     temporal_layers=1, max_frames=16)
    return dataclasses.replace(base, kind=kind, mask=mask, **kw)


def perturb_head(model: VGT, seed: int = 1) -> None:
    """Stand-in for training: make the zero-initialised last layer non-zero."""
    g = torch.Generator().manual_seed(seed)
    layer = model.last_layer()
    assert layer.bias is not None
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.2)


def make(kind: str = "hyper", mask: str = "causal", seed: int = 0, **kw: Any) -> VGT:
    torch.manual_seed(seed)
    return VGT(tiny_cfg(kind, mask, **kw), latent_channels=C, latent_size=S)


def inputs(b: int, f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, f, S, S, generator=g), torch.randint(0, 1000, (b,), generator=g)


@pytest.mark.parametrize("kind,mask", VARIANTS)
def test_zero_at_init_and_shapes_at_any_frame_count(kind, mask):
    model = make(kind, mask)
    for b in (1, 2):
        for f in (1, 3, 8):
            x, t = inputs(b, f)
            delta = model(x, t)
            assert delta.shape == x.shape
            assert torch.equal(delta, torch.zeros_like(delta))
    perturb_head(model)
    for f in (1, 3, 8):
        x, t = inputs(2, f)
        delta = model(x, t)
        assert delta.shape == x.shape and delta.abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["pure", "hyper"])
def test_trains_away_from_zero_and_gradients_reach_both_factors(kind):
    model = make(kind)
    x, t = inputs(2, 3)
    target = 0.1 * inputs(2, 3, seed=5)[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert model(x, t).abs().max() > 0
    assert losses[-1] < losses[0]
    # both factors of patch * temporal token (and the timestep path) get gradients
    for name in ("patch_embed.weight", "spatial.blocks.0.attn.to_q.weight", "pos_frame",
                 "temporal.blocks.0.mlp.0.weight", "time_mlp.0.weight", "cls"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_build_vgt_none_and_config_errors():
    assert build_vgt(tiny_cfg(kind="none"), C, S) is None
    assert isinstance(build_vgt(tiny_cfg(), C, S), VGT)
    with pytest.raises(ConfigError, match="power of two"):
        VGT(tiny_cfg(kind="hyper", patch=6), C, 12)
    pure = VGT(tiny_cfg(kind="pure", patch=3), C, 12)  # the pure head takes any patch dividing the size
    assert pure(torch.zeros(1, C, 2, 12, 12), torch.tensor([3])).shape == (1, C, 2, 12, 12)
    with pytest.raises(ConfigError, match="divide"):
        VGT(tiny_cfg(patch=4), C, 10)
    with pytest.raises(ConfigError, match="max_frames"):
        make(max_frames=4)(*inputs(1, 5))


@pytest.mark.parametrize("kind", ["pure", "hyper"])
def test_temporal_mask_causal_vs_none(kind):
    f, j = 5, 2
    for mask in ("causal", "none"):
        model = make(kind, mask)
        perturb_head(model)
        x, t = inputs(1, f)
        x2 = x.clone()
        x2[:, :, j] += torch.randn_like(x2[:, :, j])
        with torch.no_grad():
            d1, d2 = model(x, t), model(x2, t)
        before = (d1[:, :, :j] - d2[:, :, :j]).abs().max().item()
        after = (d1[:, :, j:] - d2[:, :, j:]).abs().max().item()
        assert after > 1e-4
        if mask == "causal":
            assert before == 0.0
        else:
            assert before > 1e-4


@pytest.mark.parametrize("kind", ["pure", "hyper"])
def test_spatial_mask_raster_order(kind):
    """Changing patch k changes neither patches < k nor other frames; cls (last) sees it."""
    p, g = 2, S // 2
    row, col = 1, 2
    k = row * g + col  # raster index of the changed patch
    for mask in ("causal", "none"):
        model = make(kind, mask)
        x, t = inputs(1, 3)
        x2 = x.clone()
        x2[:, :, 1, row * p:(row + 1) * p, col * p:(col + 1) * p] += 1.0
        with torch.no_grad():
            s1 = model.spatial_tokens(x, t).reshape(1, 3, g * g + 1, -1)
            s2 = model.spatial_tokens(x2, t).reshape(1, 3, g * g + 1, -1)
        diff = (s1 - s2).abs().amax(dim=-1)[0]  # (frames, tokens)
        assert diff[0].max() == 0 and diff[2].max() == 0  # other frames untouched
        assert diff[1, k:].min() > 0  # the patch itself, later patches (masked: all), cls
        assert diff[1, -1] > 0
        if mask == "causal":
            assert diff[1, :k].max() == 0
        else:
            assert diff[1, :k].min() > 0


def test_source_input():
    model = make("hyper", source=True)
    perturb_head(model)
    x, t = inputs(2, 3)
    src = inputs(2, 3, seed=7)[0]
    with torch.no_grad():
        d1 = model(x, t, src)
        d2 = model(x, t, src + 1.0)
    assert d1.shape == x.shape and (d1 - d2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="source"):
        model(x, t)
    with pytest.raises(ValueError, match="source"):
        make("hyper")(x, t, src)


# GroupNorm's batch-size sanity check reads a size as a Python bool while tracing; harmless
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")
@pytest.mark.parametrize("kind,mask", [("pure", "causal"), ("hyper", "causal"), ("hyper", "none")])
def test_onnx_dynamic_frames_and_batch_match_pytorch(kind, mask, tmp_path):
    ort = require("onnxruntime")
    model = make(kind, mask).eval()
    perturb_head(model)
    x, t = inputs(2, 4)
    path = tmp_path / "vgt.onnx"
    torch.onnx.export(model, (x, t), str(path), dynamo=False, opset_version=17,
                      input_names=["sample", "timestep"], output_names=["delta"],
                      dynamic_axes={"sample": {0: "batch", 2: "frames"}, "timestep": {0: "batch"},
                                    "delta": {0: "batch", 2: "frames"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, f in ((2, 4), (1, 1), (2, 3), (1, 8)):  # the traced shape and three other frame counts
        x, t = inputs(b, f, seed=f)
        with torch.no_grad():
            ref = model(x, t).numpy()
        out = sess.run(["delta"], {"sample": x.numpy(), "timestep": t.numpy()})[0]
        assert out.shape == ref.shape
        assert abs(ref).max() > 1e-2
        assert abs(out - ref).max() < 1e-4, (b, f)


def test_default_parameter_count():
    counts = {k: sum(p.numel() for p in VGT(dataclasses.replace(VGTConfig(), kind=k)).parameters())
              for k in ("pure", "hyper")}
    assert counts == {"pure": 3_406_912, "hyper": 4_048_708}
