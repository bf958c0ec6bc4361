"""The deep/shallow cut of apla_train.deepcache on the temporal UNet: at the same inputs the
shallow pass fed the full pass's feature gives the full pass's noise prediction (this pins
the cut), for every branch of the tiny preset, a three-level UNet and one with SD 1.5's block
layout (four levels, two layers per block, cross-attention in the outer three; small widths);
the feature's shape is what ``feature_dims`` declares; the full pass is the UNet's forward."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from apla_rt.errors import ConfigError
from apla_train.components import tiny_unet2d_config
from apla_train.deepcache import feature_dims, unet_shallow, unet_with_feature
from apla_train.unet3d import UNet3DConditionModel

THREE_LEVEL = dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD_LAYOUT = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
LAYOUTS = {"tiny": {}, "three-level": THREE_LEVEL, "sd-layout": SD_LAYOUT}


def _unet(layout: str) -> UNet3DConditionModel:
    torch.manual_seed(0)
    model = UNet3DConditionModel(UNet2DConditionModel(**{**tiny_unet2d_config(), **LAYOUTS[layout]}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like temporal layers (their output starts at zero)
        for block in model.transformer_blocks():
            for p in block.attn_temp.to_out[0].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs(b: int, f: int, size: int):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 4, f, size, size, generator=g), torch.tensor([500, 20][:b]),
            torch.randn(b, 7, 32, generator=g))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_shallow_fed_the_full_feature_is_the_full_unet(layout):
    unet = _unet(layout)
    sample, t, text = _inputs(2, 2, 8)
    with torch.no_grad():
        plain = unet(sample, t, text)
        for branch in range(len(unet.up_blocks)):
            full, feature = unet_with_feature(unet, sample, t, text, branch=branch)
            channels, size = feature_dims(unet, branch, 8)
            assert tuple(feature.shape) == (2, channels, 2, size, size)
            assert torch.equal(full, plain)  # the full pass is the UNet's own forward
            shallow = unet_shallow(unet, sample, t, text, feature, branch=branch)
            assert (shallow - full).abs().max().item() <= 1e-5, (layout, branch)
            # the shallow pass reads the feature: another one moves the output
            other = unet_shallow(unet, sample, t, text, feature + 1.0, branch=branch)
            assert (other - full).abs().max().item() > 1e-3


def test_the_shallow_pass_at_another_step_differs_and_branches_are_checked():
    unet = _unet("tiny")
    sample, t, text = _inputs(2, 2, 8)
    with torch.no_grad():
        full, feature = unet_with_feature(unet, sample, t, text)
        later = unet_shallow(unet, sample * 0.9, t - 10, text, feature)
        assert later.shape == full.shape and (later - full).abs().max().item() > 1e-4
    for bad in (-1, 2, 1.0, True):
        with pytest.raises(ConfigError, match="cache branch"):
            unet_with_feature(unet, sample, t, text, branch=bad)
