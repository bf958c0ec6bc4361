"""The deep/shallow UNet cut of DeepCache (Ma et al., CVPR 2024) over the temporal UNet.

Every few sampling steps the full UNet runs and the up-path feature that enters the cached
skip branch is kept; in between, only the outer blocks run, on that feature. Branch ``b``
(0 = the outermost, DeepCache's default) is the feature entering up block
``len(up_blocks) - 1 - b``:

* ``unet_with_feature``: the full UNet, also returning that feature;
* ``unet_shallow``: conv_in, the time embedding, down blocks 0..b (block b's resnet/attention
  pairs only, not its downsampler), the up blocks from the cut on, fed the cached feature,
  conv_out.

Both are ``UNet3DConditionModel.run`` (one model definition): fed the feature the full pass
produced from the same inputs, the shallow pass returns the full pass's noise prediction.
The exported graphs (``export.networks``) and the runtime (``apla_rt.sampling.deepcache``) use these.
"""

from __future__ import annotations

from typing import Any

import torch

from apla_rt.errors import ConfigError

DEFAULT_BRANCH = 0


def check_branch(unet: Any, branch: int) -> int:
    """``branch`` as an int in 0..len(up_blocks) - 1; ``ConfigError`` otherwise."""
    levels = len(unet.up_blocks)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < levels:
        raise ConfigError(f"cache branch must be an integer from 0 (the outermost skip branch) to "
                          f"{levels - 1} (this UNet has {levels} up blocks), got {branch!r}")
    return branch


def unet_with_feature(unet: Any, sample: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, branch: int = DEFAULT_BRANCH,
                      fused_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The full UNet: (noise_pred (b, 4, f, h, w), the feature entering the cached branch
    (b, c', f, h', w'), see ``feature_dims``)."""
    out, feature = unet.run(sample, timestep, encoder_hidden_states, fused_attention,
                            branch=check_branch(unet, branch))
    assert feature is not None
    return out, feature


def unet_shallow(unet: Any, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, feature: torch.Tensor,
                 branch: int = DEFAULT_BRANCH, fused_attention: bool = False) -> torch.Tensor:
    """noise_pred from the outer blocks only, on ``feature`` (a ``unet_with_feature`` output
    of the same branch)."""
    out, _ = unet.run(sample, timestep, encoder_hidden_states, fused_attention,
                      branch=check_branch(unet, branch), feature=feature)
    return out


def feature_dims(unet: Any, branch: int, latent: int) -> tuple[int, int]:
    """(channels, spatial size) of the cached feature for ``latent`` x ``latent`` inputs: up
    block i outputs the i-th of the reversed block widths (the mid block the widest), at the
    resolution of down block ``branch``."""
    branch = check_branch(unet, branch)
    widths = list(reversed(unet.config.block_out_channels))
    cut = len(unet.up_blocks) - 1 - branch
    channels = widths[max(cut - 1, 0)]
    size = latent
    for block in unet.down_blocks[:branch]:
        if block.downsamplers:
            size = (size + 1) // 2
    return int(channels), int(size)
