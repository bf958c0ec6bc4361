"""VGT: the Video Generation Transformer whose output is added to the UNet's noise.

Spec section 3. ``VGT(z_t, t) -> delta`` with the shape of ``z_t`` (b, c, f, h, w):

1. each frame is cut into p x p patches, linearly embedded to width d, plus learned spatial
   positions; a learned cls token per frame carries the sinusoidal timestep embedding (+ MLP);
2. spatial decoder: GPT-style pre-LN blocks over each frame's [patch tokens, cls], causal in
   raster order with cls last (it sees every patch);
3. temporal decoder: the same blocks over the frames' cls outputs, with learned frame
   positions and a causal mask over frames;
4. the patch tokens are multiplied element-wise by their frame's temporal token, then
   * Pure: a linear layer un-patchifies them to (b, c, f, h, w);
   * Hyper: the token grid (d, h/p, w/p) goes through log2(p) stride-2 transposed-conv stages
     (GroupNorm + SiLU) and a 3x3 conv.

``mask="none"`` removes both masks (the EN variants). The last layer of each head starts at
zero, so delta is exactly 0 at init. Every frame-dependent operation is a tensor op on sizes
read from the input, so the ONNX graph accepts any batch and frame count.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from apla_rt.errors import ConfigError
from apla_train.config import VGTConfig


def _is_exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """Boolean (length, length) mask, True where attention is blocked (key after query).

    Built from ``torch.arange`` so that a traced ``length`` stays dynamic in ONNX.
    """
    idx = torch.arange(length, device=device)
    return idx.unsqueeze(0) > idx.unsqueeze(1)


def timestep_embedding(timestep: torch.Tensor, freqs: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (b,) -> (b, dim): [cos(t w_i), sin(t w_i)], zero-padded if odd."""
    args = timestep.to(freqs.dtype).unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Multi-head self-attention with an optional boolean mask (True = blocked)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (n, L, d) -> (n, heads, L, head_dim); -1 keeps n and L dynamic
        return x.reshape(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(x)), self._split(self.to_v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim)
        return self.to_out(out)


class Block(nn.Module):
    """GPT-style pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """A stack of blocks and a final LayerNorm; causal or unmasked over the sequence axis."""

    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(x.shape[1], x.device) if self.causal else None
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def _groups(channels: int, max_groups: int = 32) -> int:
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class HyperHead(nn.Module):
    """Token grid (n, d, h/p, w/p) -> (n, c, h, w): log2(p) x [ConvT s2, GroupNorm, SiLU], 3x3 conv.

    Each stage doubles the resolution and halves the width (not below 32 or d).
    """

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        stages: list[nn.Module] = []
        ch = dim
        for _ in range(int(math.log2(patch))):
            nxt = max(ch // 2, min(32, dim))
            stages += [nn.ConvTranspose2d(ch, nxt, kernel_size=4, stride=2, padding=1),
                       nn.GroupNorm(_groups(nxt), nxt), nn.SiLU()]
            ch = nxt
        self.up = nn.Sequential(*stages)
        self.out = nn.Conv2d(ch, out_channels, kernel_size=3, padding=1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(grid))


class VGT(nn.Module):
    """Video Generation Transformer: (sample, timestep[, source]) -> delta, same shape as sample."""

    freqs: torch.Tensor

    def __init__(self, cfg: VGTConfig, latent_channels: int = 4, latent_size: int = 64):
        super().__init__()
        if cfg.kind not in ("pure", "hyper"):
            raise ConfigError(f"vgt.kind={cfg.kind!r} builds no VGT; use build_vgt (returns None)")
        p = cfg.patch
        if p < 1 or latent_size % p:
            raise ConfigError(f"vgt.patch ({p}) must divide the latent size ({latent_size})")
        if cfg.kind == "hyper" and p & (p - 1):
            raise ConfigError(f"vgt.patch ({p}) must be a power of two for the hyper head")
        if cfg.dim < 1 or cfg.heads < 1 or cfg.dim % cfg.heads:
            raise ConfigError(f"vgt.dim ({cfg.dim}) must be divisible by vgt.heads ({cfg.heads})")
        if cfg.max_frames < 1:
            raise ConfigError(f"vgt.max_frames must be at least 1 (got {cfg.max_frames})")
        self.cfg = cfg
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.grid = latent_size // p  # tokens per side
        d = cfg.dim
        in_channels = latent_channels * (2 if cfg.source else 1)
        causal = cfg.mask == "causal"

        # 1. tokens
        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=p, stride=p)  # linear per patch
        self.pos_spatial = nn.Parameter(torch.zeros(1, self.grid * self.grid, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        half = d // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        # 2-3. decoders
        self.spatial = Decoder(d, cfg.heads, cfg.spatial_layers, cfg.mlp_ratio, causal)
        self.pos_frame = nn.Parameter(torch.zeros(1, cfg.max_frames, d))
        self.temporal = Decoder(d, cfg.heads, cfg.temporal_layers, cfg.mlp_ratio, causal)
        # 4. head
        if cfg.kind == "pure":
            self.head: nn.Module = nn.Linear(d, latent_channels * p * p)
        else:
            self.head = HyperHead(d, p, latent_channels)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_spatial, std=0.02)
        nn.init.trunc_normal_(self.pos_frame, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        # zero the head's last layer only: delta == 0 exactly, both factors stay non-zero
        last = self.last_layer()
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def last_layer(self) -> nn.Linear | nn.Conv2d:
        """The head's last layer (zero at init): the Pure linear or the Hyper 3x3 conv."""
        layer = self.head.out if isinstance(self.head, HyperHead) else self.head
        assert isinstance(layer, (nn.Linear, nn.Conv2d))
        return layer

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        # ConvTranspose2d keeps PyTorch's default (fan-in scaled) init

    # -- pieces, exposed for tests -------------------------------------------------------

    def _check(self, sample: torch.Tensor, source: Optional[torch.Tensor]) -> None:
        if self.cfg.source and source is None:
            raise ValueError("this VGT was built with vgt.source=True: pass the clean source latent")
        if not self.cfg.source and source is not None:
            raise ValueError("source given but this VGT was built with vgt.source=False")
        if _is_exporting():
            return
        b, c, f, h, w = sample.shape
        if c != self.latent_channels or h != self.latent_size or w != self.latent_size:
            raise ConfigError(f"VGT built for {self.latent_channels} x {self.latent_size} x "
                              f"{self.latent_size} latents, got (b, c, f, h, w) = {tuple(sample.shape)}")
        if f > self.cfg.max_frames:
            raise ConfigError(f"{f} frames exceed vgt.max_frames ({self.cfg.max_frames})")
        if source is not None and source.shape != sample.shape:
            raise ValueError(f"source {tuple(source.shape)} and sample {tuple(sample.shape)} differ")

    def spatial_tokens(self, sample: torch.Tensor, timestep: torch.Tensor,
                       source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Spatial decoder output, (b * f, n_patches + 1, d): patches in raster order, cls last."""
        self._check(sample, source)
        x = sample if source is None else torch.cat([sample, source], dim=1)
        b, c, f = x.shape[0], x.shape[1], x.shape[2]
        frames = x.transpose(1, 2).reshape(-1, c, x.shape[3], x.shape[4])  # (b*f, c, h, w)
        tokens = self.patch_embed(frames).flatten(2).transpose(1, 2) + self.pos_spatial
        temb = self.time_mlp(timestep_embedding(timestep, self.freqs, self.cfg.dim))  # (b, d)
        cls = self.cls + temb.unsqueeze(1)  # (b, 1, d)
        cls = cls.unsqueeze(1).expand(b, f, 1, self.cfg.dim).reshape(-1, 1, self.cfg.dim)
        return self.spatial(torch.cat([tokens, cls], dim=1))

    def temporal_tokens(self, cls_out: torch.Tensor, batch: int) -> torch.Tensor:
        """Temporal decoder over the frames' cls outputs: (b * f, d) -> (b, f, d)."""
        seq = cls_out.reshape(batch, -1, self.cfg.dim)
        seq = seq + self.pos_frame[:, : seq.shape[1]]
        return self.temporal(seq)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                source: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, f, h, w = sample.shape
        spatial = self.spatial_tokens(sample, timestep, source)  # (b*f, N + 1, d)
        patches, cls_out = spatial[:, :-1], spatial[:, -1]
        temporal = self.temporal_tokens(cls_out, b)  # (b, f, d)
        grid = patches * temporal.reshape(-1, 1, self.cfg.dim)  # (b*f, N, d)
        g, p = self.grid, self.cfg.patch
        if self.cfg.kind == "pure":
            out = self.head(grid)  # (b*f, N, c*p*p)
            out = out.reshape(-1, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
            out = out.reshape(-1, c, g * p, g * p)
        else:
            out = self.head(grid.transpose(1, 2).reshape(-1, self.cfg.dim, g, g))
        return out.reshape(b, f, c, h, w).transpose(1, 2)


def build_vgt(cfg: VGTConfig, latent_channels: int = 4, latent_size: int = 64) -> Optional[VGT]:
    """The VGT for ``cfg``, or None when ``cfg.kind == "none"`` (plain Tune-A-Video)."""
    if cfg.kind == "none":
        return None
    return VGT(cfg, latent_channels, latent_size)
