"""The 1x1-convolution discriminator (spec section 4).

Frames are folded into channels, (b, c, f, h, w) -> (b, c * f, h, w), and only 1x1 convs
follow (c * f -> hidden... -> 1, LeakyReLU 0.2, optional spectral norm), so each latent
position's whole temporal profile is judged on its own: the output is one logit per
position, (b, 1, h, w). It is built for one frame count and refuses any other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from apla_rt.errors import ConfigError
from apla_train.config import DiscriminatorConfig


class Discriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, latent_channels: int, n_frames: int):
        super().__init__()
        if latent_channels < 1 or n_frames < 1:
            raise ConfigError(f"discriminator needs at least 1 channel and 1 frame "
                              f"(got {latent_channels} channels, {n_frames} frames)")
        if any(h < 1 for h in cfg.hidden):
            raise ConfigError(f"disc.hidden widths must be at least 1 (got {list(cfg.hidden)})")
        self.latent_channels = latent_channels
        self.n_frames = n_frames
        widths = [latent_channels * n_frames, *cfg.hidden, 1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            conv = nn.Conv2d(cin, cout, kernel_size=1)
            layers.append(spectral_norm(conv) if cfg.spectral_norm else conv)
            if i < len(widths) - 2:
                layers.append(nn.LeakyReLU(0.2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, f, h, w) -> logits (b, 1, h, w)."""
        if x.dim() != 5 or x.shape[1] != self.latent_channels or x.shape[2] != self.n_frames:
            raise ConfigError(
                f"discriminator built for {self.latent_channels} channels x {self.n_frames} frames, "
                f"got a tensor of shape {tuple(x.shape)}; rebuild it for this frame count")
        b, c, f, h, w = x.shape
        return self.net(x.reshape(b, c * f, h, w))
