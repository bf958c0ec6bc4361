"""Tune-A-Video's temporal UNet, built by inflating diffusers' ``UNet2DConditionModel``.

The 3D UNet owns the 2D UNet's modules under their own names (so SD 1.x weights load with
their keys unchanged) and adds, to every transformer block, ``norm_temp`` and ``attn_temp``.
Its forward pass is written here, over the diffusers modules, for tensors (b, c, f, h, w):

* every 2D conv runs per frame with shared weights (frames folded into the batch);
* resnet GroupNorms (and ``conv_norm_out``) pool their statistics over all frames;
* the transformer's input GroupNorm is per frame; ``attn1`` is sparse-causal (frame i
  attends to frames 0 and i-1), ``attn2`` and the feed-forward are SD's; ``attn_temp``
  attends over the f frames at each spatial position, after ``norm_temp``, and its output
  projection starts at zero so the inflated model starts as SD.

Every frame-dependent step is a tensor op (reshape, expand, slice, cat), so the module
exports to ONNX with a dynamic frame axis.

The forward reads diffusers' module attributes directly, so it is tied to the diffusers
releases it is tested against: ``DIFFUSERS_RANGE``, the range setup.py pins
(``diffusers_version_problem`` says why another version is refused).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from apla_rt.errors import ConfigError

# the diffusers releases the forward below is tested against (setup.py pins the same range)
DIFFUSERS_RANGE = ">=0.42,<0.43"
SUPPORTED_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                    "CrossAttnUpBlock2D", "UpBlock2D"}
TEMPORAL_KEYS = ("attn_temp", "norm_temp")
TRAINABLE_SUFFIXES = ("attn1.to_q", "attn2.to_q", "attn_temp")


def _fold(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w)."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _unfold(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b*f, c, h, w) -> (b, c, f, h, w)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def _repeat_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b, ...) -> (b*f, ...), each video's row repeated for its frames."""
    return x.unsqueeze(1).expand(x.shape[0], frames, *x.shape[1:]).reshape(-1, *x.shape[1:])


def group_norm_over_frames(norm: nn.GroupNorm, x: torch.Tensor, frames: int) -> torch.Tensor:
    """GroupNorm on folded (b*f, c, h, w) with statistics pooled over each video's frames."""
    y = F.group_norm(_unfold(x, frames), norm.num_groups, norm.weight, norm.bias, norm.eps)
    return _fold(y)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Scaled dot-product attention on (b, n, heads*d) projections -> (b, n, heads*d)."""
    def split(t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, heads, d // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class FusedAttention(torch.autograd.Function):
    """SDPA in PyTorch; exported as ONNX Runtime's fused ``com.microsoft.MultiHeadAttention``.

    Only used for the ONNX Runtime flavour of the export (``fused_attention=True``): the
    decomposed graph materialises every (queries x keys) score matrix, which at 32x32
    latents costs gigabytes and most of the time on CPU; the fused kernel does not.
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float):  # noqa: D401 - autograd API
        return _sdpa(q, k, v, heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)
        out.setType(q.type())  # (b, n, heads*d) like the queries: tells the exporter its shape
        return out


def attention(attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
              keys: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """Multi-head attention with a diffusers ``Attention``'s projections.

    ``keys`` (already projected input for k/v, by token) overrides ``context``; it is how
    sparse-causal attention supplies frames 0 and i-1. ``fused`` only changes how the
    attention is exported to ONNX (see ``FusedAttention``), never the result.
    """
    q = attn.to_q(x)
    src = x if context is None else context
    k = attn.to_k(src) if keys is None else attn.to_k(keys)
    v = attn.to_v(src) if keys is None else attn.to_v(keys)
    if fused and torch.onnx.is_in_onnx_export():
        out = FusedAttention.apply(q, k, v, int(attn.heads), float(attn.scale))
    else:
        out = _sdpa(q, k, v, int(attn.heads), float(attn.scale))
    return attn.to_out[1](attn.to_out[0](out))


def sparse_causal_keys(x: torch.Tensor, frames: int) -> torch.Tensor:
    """For tokens (b*f, n, d): per frame i, tokens of frame 0 then of frame i-1 (0 for i=0)."""
    bf, n, d = x.shape
    v = x.reshape(bf // frames, frames, n, d)
    first = v[:, :1].expand_as(v)
    former = torch.cat([v[:, :1], v[:, :-1]], dim=1)
    return torch.cat([first, former], dim=2).reshape(bf, 2 * n, d)


class UNet3DConditionModel(nn.Module):
    """The temporal UNet. ``forward(sample (b,4,f,h,w), timestep (b,), text (b,seq,d))``."""

    def __init__(self, unet2d: nn.Module, temporal: bool = True):
        super().__init__()
        cfg = unet2d.config
        blocks = set(cfg.down_block_types) | set(cfg.up_block_types) | {cfg.mid_block_type}
        unsupported = sorted(blocks - SUPPORTED_BLOCKS)
        if unsupported:
            raise ConfigError(f"unsupported UNet block types {unsupported}: APLA supports SD 1.x UNets")
        if getattr(cfg, "addition_embed_type", None) or getattr(cfg, "class_embed_type", None):
            raise ConfigError("UNets with class or added embeddings are not SD 1.x; not supported")
        self.config = cfg
        self.temporal = temporal
        self.gradient_checkpointing = False
        for name, child in unet2d.named_children():
            self.add_module(name, child)
        for block in self.transformer_blocks():
            self._inflate(block)

    @staticmethod
    def _inflate(block: nn.Module) -> None:
        from diffusers.models.attention_processor import Attention

        if getattr(block, "only_cross_attention", False) or getattr(block, "norm_type", "layer_norm") != "layer_norm":
            raise ConfigError("transformer blocks other than SD 1.x's are not supported")
        dim = block.norm1.normalized_shape[0]
        heads = block.attn1.heads
        block.add_module("norm_temp", nn.LayerNorm(dim))
        block.add_module("attn_temp", Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False))
        nn.init.zeros_(block.attn_temp.to_out[0].weight)
        nn.init.zeros_(block.attn_temp.to_out[0].bias)

    def transformer_blocks(self):
        from diffusers.models.attention import BasicTransformerBlock

        for module in self.modules():
            if isinstance(module, BasicTransformerBlock):
                yield module

    # -- blocks ----------------------------------------------------------------------

    def _resnet(self, resnet: nn.Module, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        if resnet.time_embedding_norm != "default" or resnet.upsample is not None or resnet.downsample is not None:
            raise ConfigError("only SD 1.x resnet blocks are supported")
        h = resnet.nonlinearity(group_norm_over_frames(resnet.norm1, x, frames))
        h = resnet.conv1(h)
        h = h + resnet.time_emb_proj(resnet.nonlinearity(temb))[:, :, None, None]
        h = resnet.nonlinearity(group_norm_over_frames(resnet.norm2, h, frames))
        h = resnet.conv2(resnet.dropout(h))
        if resnet.conv_shortcut is not None:
            x = resnet.conv_shortcut(x)
        return (x + h) / resnet.output_scale_factor

    def _block(self, block: nn.Module, x: torch.Tensor, text: torch.Tensor, frames: int,
               fused: bool = False) -> torch.Tensor:
        h = block.norm1(x)
        x = attention(block.attn1, h, keys=sparse_causal_keys(h, frames), fused=fused) + x
        x = attention(block.attn2, block.norm2(x), context=text, fused=fused) + x
        x = block.ff(block.norm3(x)) + x
        if self.temporal:
            bf, n, d = x.shape
            t = x.reshape(bf // frames, frames, n, d).transpose(1, 2).reshape(-1, frames, d)
            t = attention(block.attn_temp, block.norm_temp(t), fused=fused) + t
            x = t.reshape(bf // frames, n, frames, d).transpose(1, 2).reshape(bf, n, d)
        return x

    def _transformer(self, tr: nn.Module, x: torch.Tensor, text: torch.Tensor, frames: int,
                     fused: bool = False) -> torch.Tensor:
        bf, _, h, w = x.shape
        residual = x
        x = tr.norm(x)
        if not tr.use_linear_projection:
            x = tr.proj_in(x)
        d = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(bf, h * w, d)
        if tr.use_linear_projection:
            x = tr.proj_in(x)
        for block in tr.transformer_blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(self._block, block, x, text, frames, use_reentrant=False)
            else:
                x = self._block(block, x, text, frames, fused)
        if tr.use_linear_projection:
            x = tr.proj_out(x)
        x = x.reshape(bf, h, w, -1).permute(0, 3, 1, 2)
        if not tr.use_linear_projection:
            x = tr.proj_out(x)
        return x + residual

    def _res(self, resnet, x, temb, frames):
        if self.gradient_checkpointing and self.training:
            return checkpoint(self._resnet, resnet, x, temb, frames, use_reentrant=False)
        return self._resnet(resnet, x, temb, frames)

    # -- forward ---------------------------------------------------------------------

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, fused_attention: bool = False) -> torch.Tensor:
        """``fused_attention`` exports attention as ONNX Runtime's fused op (same result)."""
        return self.run(sample, timestep, encoder_hidden_states, fused_attention)[0]

    def run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
            fused_attention: bool = False, *, branch: int | None = None,
            feature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(noise_pred, feature) with the cut of a deep/shallow cache (``apla_train.deepcache``).

        ``branch`` b (0 = the outermost skip branch) names the feature entering up block
        ``len(up_blocks) - 1 - b``. Without ``feature`` this is the full UNet, and with
        ``branch`` it also returns that feature (b, c, f, h', w'); with ``feature`` it is the
        shallow pass: conv_in, down blocks 0..b (block b without its downsampler: only its
        resnet/attention pairs feed the skips), then up blocks from the cut on ``feature``,
        conv_out. The same code runs both passes, so the shallow pass fed the feature of a
        full pass on the same inputs repeats that pass's outer blocks op for op."""
        frames = sample.shape[2]
        down_blocks: Any = self.down_blocks
        up_blocks: Any = self.up_blocks
        up_factor = 2 ** sum(1 for block in up_blocks if block.upsamplers)
        forward_upsample_size = any(s % up_factor for s in sample.shape[-2:])
        shallow = feature is not None
        if shallow and branch is None:
            raise ValueError("the shallow pass needs the branch its feature was cut at")
        cut = len(up_blocks) - 1 - branch if branch is not None else None

        timestep = timestep.reshape(-1).expand(sample.shape[0])
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        temb = _repeat_frames(temb, frames)
        text = _repeat_frames(encoder_hidden_states, frames)

        x = self.conv_in(_fold(sample))
        skips = [x]
        for k, block in enumerate(down_blocks):
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attns):
                x = self._res(resnet, x, temb, frames)
                if attn is not None:
                    x = self._transformer(attn, x, text, frames, fused_attention)
                skips.append(x)
            if shallow and k == branch:
                break
            for down in block.downsamplers or []:
                x = down(x)
                skips.append(x)

        if shallow:
            assert feature is not None
            x = _fold(feature)
        else:
            mid = self.mid_block
            x = self._res(mid.resnets[0], x, temb, frames)
            for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
                x = self._transformer(attn, x, text, frames, fused_attention)
                x = self._res(resnet, x, temb, frames)

        cached = None
        for i, block in enumerate(up_blocks):
            if cut is not None and i < cut and shallow:
                continue
            if i == cut and not shallow:
                cached = x
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[2:] if (i < len(up_blocks) - 1 and forward_upsample_size) else None
            attns = getattr(block, "attentions", None) or [None] * n
            for resnet, attn in zip(block.resnets, attns):
                x = torch.cat([x, res.pop()], dim=1)
                x = self._res(resnet, x, temb, frames)
                if attn is not None:
                    x = self._transformer(attn, x, text, frames, fused_attention)
            for up in block.upsamplers or []:
                x = up(x, upsample_size)
        assert not skips, "the down and up paths took different numbers of skips"

        x = self.conv_act(group_norm_over_frames(self.conv_norm_out, x, frames))
        out = _unfold(self.conv_out(x), frames)
        return out, (_unfold(cached, frames) if cached is not None else None)


def is_trainable_name(name: str, mode: str = "tav", temporal: bool = True) -> bool:
    """Whether a parameter of the UNet is fine-tuned (spec section 2: the TAV subset).

    With the temporal branch off, its layers get no gradient and are not trained (DDP
    would otherwise wait for their gradients forever)."""
    if not temporal and any(f"{key}." in name for key in TEMPORAL_KEYS):
        return False
    if mode == "all":
        return True
    module = name.rsplit(".", 1)[0]
    return module.endswith(TRAINABLE_SUFFIXES) or ".attn_temp." in name + "."


def load_2d_weights_strict(unet3d: UNet3DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Load a 2D SD UNet state dict; only the temporal keys may be missing, nothing extra."""
    result = unet3d.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(t in k for t in TEMPORAL_KEYS)]
    if missing or result.unexpected_keys:
        raise ConfigError(f"UNet weights do not match the model: {len(missing)} missing "
                          f"(e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected "
                          f"(e.g. {result.unexpected_keys[:1]})")


def diffusers_version_problem(version: str) -> str | None:
    """Why diffusers ``version`` cannot run this UNet's forward, or None when it is in the
    tested ``DIFFUSERS_RANGE``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = Version(version) in SpecifierSet(DIFFUSERS_RANGE)
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"diffusers {version} is outside {DIFFUSERS_RANGE}, the range the temporal UNet's "
            f"hand-written forward is tested against; install a diffusers in that range "
            f"(pip install 'diffusers{DIFFUSERS_RANGE}')")
