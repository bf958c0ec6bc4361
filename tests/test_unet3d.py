"""The temporal UNet: parity with diffusers, sparse-causal attention, frame-pooled GroupNorm,
any frame count, strict loading of 2D weights and the trainable subset (spec section 2).

Tiny UNets only (channels (32, 64), 8 groups, 1 layer per block), seeded; SD 1.x's real
shape is only counted, on the meta device.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from apla_rt.errors import ConfigError
from apla_train.components import tiny_unet2d_config
from apla_train.unet3d import (DIFFUSERS_RANGE, UNet3DConditionModel, attention, diffusers_version_problem,
                               group_norm_over_frames, is_trainable_name, load_2d_weights_strict,
                               sparse_causal_keys)

TEXT_DIM = 32  # tiny_unet2d_config's cross_attention_dim

# A three-level variant (up factor 4, two layers per block) to exercise skips and odd sizes.
THREE_LEVEL = dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def unet2d(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**tiny_unet2d_config(), **overrides}).eval()


def unet3d(seed: int = 0, temporal: bool = True, **overrides) -> UNet3DConditionModel:
    return UNet3DConditionModel(unet2d(seed, **overrides), temporal=temporal).eval()


def perturb_temporal(model: UNet3DConditionModel, seed: int = 1, scale: float = 0.2) -> None:
    """Stand-in for training: make every zero-initialised attn_temp output projection non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.transformer_blocks():
            out = block.attn_temp.to_out[0]
            out.weight.copy_(torch.randn(out.weight.shape, generator=g) * scale)
            out.bias.copy_(torch.randn(out.bias.shape, generator=g) * scale)


def inputs(b: int, f: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, f, size, size, generator=g),
            torch.randint(0, 1000, (b,), generator=g),
            torch.randn(b, 7, TEXT_DIM, generator=g))


def up_factor(model: nn.Module) -> int:
    return 2 ** sum(1 for block in model.up_blocks if block.upsamplers)


# ---------------------------------------------------------------------------------------
# Parity with diffusers' UNet2DConditionModel


@pytest.mark.parametrize("overrides,size,temporal", [
    ({}, 16, False),
    ({}, 9, False),  # not a multiple of the up factor (2): diffusers' forward_upsample_size path
    ({"use_linear_projection": True}, 16, False),
    (THREE_LEVEL, 10, False),  # up factor 4, 10 % 4 != 0
    ({}, 9, True),  # the temporal branch on, at init: still SD on one frame
])
def test_single_frame_matches_diffusers_unet2d(overrides, size, temporal):
    ref = unet2d(0, **overrides)
    model = UNet3DConditionModel(copy.deepcopy(ref), temporal=temporal).eval()
    assert size == 16 or size % up_factor(model)  # the odd sizes really are odd
    x, t, text = inputs(2, 1, size)
    with torch.no_grad():
        expected = ref(x[:, :, 0], t, text).sample
        out = model(x, t, text)
    assert out.shape == x.shape
    assert expected.abs().max() > 0.1  # a real output, not a degenerate zero
    assert (out[:, :, 0] - expected).abs().max().item() < 1e-5


def test_temporal_branch_adds_exactly_zero_at_init():
    """f = 3 frames interact (sparse-causal attn1, pooled GroupNorm), so compare the model
    with attn_temp on against itself with attn_temp off: zero output projection -> identical."""
    model = unet3d(0)
    x, t, text = inputs(2, 3, 16)
    with torch.no_grad():
        on = model(x, t, text)
        model.temporal = False
        off = model(x, t, text)
        model.temporal = True
        perturb_temporal(model)
        trained = model(x, t, text)
    assert torch.equal(on, off)
    assert (trained - off).abs().max() > 1e-3  # the branch is live once its projection is not 0


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_any_frame_count_and_videos_in_a_batch_are_independent(frames):
    model = unet3d(0)
    perturb_temporal(model)
    x, t, text = inputs(2, frames, 8, seed=frames)
    with torch.no_grad():
        both = model(x, t, text)
        first = model(x[:1], t[:1], text[:1])
    assert both.shape == (2, 4, frames, 8, 8) and torch.isfinite(both).all()
    assert (both[:1] - first).abs().max() < 1e-5  # no statistic or attention crosses videos


# ---------------------------------------------------------------------------------------
# Sparse-causal self-attention


def first_block(model: UNet3DConditionModel) -> nn.Module:
    return next(model.transformer_blocks())


def changed_frames(a: torch.Tensor, b: torch.Tensor, frames: int) -> set[int]:
    """Frames (axis 0 of folded (b*f, ...) tensors, one video) whose values moved."""
    diff = (a - b).abs().reshape(frames, -1).amax(1)
    assert all(d < 1e-6 or d > 1e-3 for d in diff.tolist()), diff  # clear separation
    return {i for i, d in enumerate(diff.tolist()) if d > 1e-3}


def test_sparse_causal_keys_are_frame_0_then_frame_i_minus_1():
    f, n, d = 4, 3, 5
    x = torch.arange(2 * f * n * d, dtype=torch.float32).reshape(2 * f, n, d)
    keys = sparse_causal_keys(x, f)
    assert keys.shape == (2 * f, 2 * n, d)
    for video in range(2):
        frame = x.reshape(2, f, n, d)[video]
        for i in range(f):
            k = keys[video * f + i]
            assert torch.equal(k[:n], frame[0])
            assert torch.equal(k[n:], frame[max(i - 1, 0)])


@pytest.mark.parametrize("level", ["attn1", "block"])
def test_frame_i_depends_only_on_frames_0_and_i_minus_1(level):
    """Perturb frame j: only frame j (its queries), frame j+1 (its i-1) and, for j = 0, every
    frame (its first-frame keys) change: at the attention and at the transformer-block level
    (temporal branch off; norm1/attn2/ff act per token)."""
    model = unet3d(0, temporal=False)
    block = first_block(model)
    f, n, d = 5, 6, block.norm1.normalized_shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(f, n, d, generator=g)
    text = torch.randn(f, 7, TEXT_DIM, generator=g)

    def run(h):
        if level == "attn1":
            return attention(block.attn1, h, keys=sparse_causal_keys(h, f))
        return model._block(block, h, text, f)

    with torch.no_grad():
        base = run(x)
        for j in range(f):
            x2 = x.clone()
            x2[j] += torch.randn(n, d, generator=g)
            expected = set(range(f)) if j == 0 else {j, j + 1} & set(range(f))
            assert changed_frames(base, run(x2), f) == expected, j


def test_temporal_attention_lets_every_frame_see_every_other():
    model = unet3d(0, temporal=True)
    perturb_temporal(model)
    block = first_block(model)
    f, n, d = 5, 6, block.norm1.normalized_shape[0]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(f, n, d, generator=g), torch.randn(f, 7, TEXT_DIM, generator=g)
    x2 = x.clone()
    x2[4] += torch.randn(n, d, generator=g)  # not a constant: norm1/norm_temp would remove it
    with torch.no_grad():
        assert changed_frames(model._block(block, x, text, f), model._block(block, x2, text, f), f) == set(range(f))


# ---------------------------------------------------------------------------------------
# GroupNorm pooled over frames


def test_group_norm_over_frames_pools_statistics_over_the_clip():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    b, f = 2, 3
    scales = torch.tensor([1.0, 3.0, 0.5]).repeat(b)[:, None, None, None]
    x = torch.randn(b * f, 16, 5, 5) * scales + 0.7
    pooled = group_norm_over_frames(norm, x, f)
    per_frame = norm(x)
    # by hand: mean/var over (channels of the group, frames, h, w) of each video
    v = x.reshape(b, f, 4, 4, 5, 5)
    mean = v.mean(dim=(1, 3, 4, 5), keepdim=True)
    var = v.var(dim=(1, 3, 4, 5), unbiased=False, keepdim=True)
    manual = ((v - mean) / torch.sqrt(var + norm.eps)).reshape(b * f, 16, 5, 5)
    manual = manual * norm.weight[:, None, None] + norm.bias[:, None, None]
    assert (pooled - manual).abs().max() < 1e-5
    assert (pooled - per_frame).abs().max() > 0.1  # per-frame statistics differ
    # one frame alone: the plain per-frame GroupNorm
    assert (group_norm_over_frames(norm, x, 1) - per_frame).abs().max() < 1e-5
    # frames of a video interact, videos do not
    x2 = x.clone()
    x2[2] *= 4.0  # video 0, frame 2
    moved = (group_norm_over_frames(norm, x2, f) - pooled).abs().reshape(b * f, -1).amax(1)
    assert moved[0] > 1e-3 and moved[1] > 1e-3
    assert moved[3:].max() == 0


def test_full_model_frames_interact_through_pooled_group_norm():
    """Temporal branch off: frame 0 of the output still moves when frame 2 moves, because the
    resnet GroupNorms pool over frames (attn1 alone would keep frame 0 independent of it)."""
    model = unet3d(0, temporal=False)
    x, t, text = inputs(1, 3, 8)
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    with torch.no_grad():
        diff = (model(x, t, text) - model(x2, t, text)).abs().amax(dim=(0, 1, 3, 4))
    assert diff[0] > 1e-4


# ---------------------------------------------------------------------------------------
# Loading 2D weights, the trainable subset


def test_2d_state_dict_loads_strictly_with_only_temporal_keys_missing():
    source = unet2d(0)
    state = source.state_dict()
    model = unet3d(seed=1)  # other random weights
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(re.search(r"\.(attn_temp|norm_temp)\.", k) for k in result.missing_keys)
    temporal = {k for k in model.state_dict() if "_temp." in k}
    assert set(result.missing_keys) == temporal

    model = unet3d(seed=1)
    load_2d_weights_strict(model, state)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    x, t, text = inputs(1, 1, 16)
    with torch.no_grad():
        assert (model(x, t, text)[:, :, 0] - source(x[:, :, 0], t, text).sample).abs().max() < 1e-5

    missing = {k: v for k, v in state.items() if not k.endswith("attn1.to_q.weight")}
    with pytest.raises(ConfigError, match="missing"):
        load_2d_weights_strict(unet3d(1), missing)
    with pytest.raises(ConfigError, match="1 unexpected"):
        load_2d_weights_strict(unet3d(1), {**state, "extra.weight": torch.zeros(1)})


def test_trainable_subset_is_attn1_q_attn2_q_and_attn_temp():
    model = unet3d(0)
    names = [n for n, _ in model.named_parameters()]
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 4  # down 1, mid 1, up 2
    expected = set()
    for b in blocks:
        expected |= {f"{b}.attn1.to_q.weight", f"{b}.attn2.to_q.weight"}
        expected |= {n for n in names if n.startswith(f"{b}.attn_temp.")}
    assert len(expected) == 4 * (2 + 5)  # attn_temp: to_q, to_k, to_v, to_out.0.{weight, bias}
    assert {n for n in names if is_trainable_name(n, "tav")} == expected
    assert all(is_trainable_name(n, "all") for n in names)
    b = blocks[0]
    for name in ("attn1.to_k.weight", "attn2.to_v.weight", "norm_temp.weight", "attn1.to_out.0.weight",
                 "ff.net.0.proj.weight"):
        assert not is_trainable_name(f"{b}.{name}", "tav"), name


def test_sd1_trainable_count_on_meta_device():
    """SD 1.x's UNet (860 M) inflated: 74.35 M trainable (spec section 2), nothing allocated."""
    with torch.device("meta"):
        sd = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        model = UNet3DConditionModel(sd)
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    total_2d = sum(p.numel() for n, p in params.items() if "_temp." not in n)
    trainable = sum(p.numel() for n, p in params.items() if is_trainable_name(n, "tav"))
    assert total_2d == 859_520_964
    assert round(trainable / 1e6, 2) == 74.35
    assert trainable == 74_354_880  # 6 d^2 + d per block: 5 blocks at 320, 5 at 640, 6 at 1280


def test_unsupported_unet_is_a_config_error():
    ref = unet2d(0, down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(ConfigError, match="AttnDownBlock2D"):
        UNet3DConditionModel(ref)



def test_temporal_layers_are_not_trained_when_the_temporal_branch_is_off():
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight"
    norm = "down_blocks.0.attentions.0.transformer_blocks.0.norm_temp.weight"
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert is_trainable_name(name) and is_trainable_name(norm, "all")
    for mode in ("tav", "all"):
        assert not is_trainable_name(name, mode, temporal=False)
        assert not is_trainable_name(norm, mode, temporal=False)
        assert is_trainable_name(q, mode, temporal=False)


# ---------------------------------------------------------------------------------------
# The diffusers range the hand-written forward is tested against


def test_installed_diffusers_is_in_the_tested_range():
    import diffusers

    problem = diffusers_version_problem(diffusers.__version__)
    assert problem is None, problem


@pytest.mark.parametrize("version", ["0.34.0", "0.43.0", "1.0.0", "not-a-version"])
def test_a_diffusers_outside_the_range_is_named_with_the_fix(version):
    problem = diffusers_version_problem(version)
    assert problem is not None and version in problem and DIFFUSERS_RANGE in problem
    assert f"pip install 'diffusers{DIFFUSERS_RANGE}'" in problem


def test_setup_pins_the_tested_diffusers_range():
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert f'"diffusers{DIFFUSERS_RANGE}"' in setup


def test_transformer_blocks_are_found_by_class():
    model = unet3d(**THREE_LEVEL)
    expected = [b for block in [*model.down_blocks, model.mid_block, *model.up_blocks]
                for tr in (getattr(block, "attentions", None) or []) for b in tr.transformer_blocks]
    found = list(model.transformer_blocks())
    assert len(found) == len(expected) == 11 and {id(b) for b in found} == {id(b) for b in expected}
    assert all(hasattr(b, "attn_temp") and hasattr(b, "norm_temp") for b in found)
