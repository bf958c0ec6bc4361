"""One export contract per network: wrapper module, tensor names, named dims, example inputs.

The wrappers only rename inputs/outputs to the contract of docs/architecture.md; the
networks themselves are ``apla_train``'s classes, rebuilt from the run (nothing re-declared).
Each contract is ``apla_rt.folder.contract``'s ``NetworkSpec`` and ``TensorSpec``: what the export
declares is what the runtime reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from apla_rt.folder.contract import NetworkSpec, TensorSpec
from apla_rt.engine import DECODE_CHUNK
from apla_train.deepcache import feature_dims, unet_shallow, unet_with_feature



class TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class UNetWrapper(nn.Module):
    """``fused_attention``: export attention as ONNX Runtime's fused op (the ORT flavour)."""

    def __init__(self, unet: nn.Module, fused_attention: bool = False):
        super().__init__()
        self.unet = unet
        self.fused_attention = fused_attention

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, fused_attention=self.fused_attention)


class UNetFeatureWrapper(nn.Module):
    """The full UNet with a second output, the feature entering the cached skip branch
    (``apla_train.deepcache``)."""

    def __init__(self, unet: nn.Module, branch: int, fused_attention: bool = False):
        super().__init__()
        self.unet = unet
        self.branch = branch
        self.fused_attention = fused_attention

    def forward(self, sample, timestep, encoder_hidden_states):
        return unet_with_feature(self.unet, sample, timestep, encoder_hidden_states, self.branch,
                                 self.fused_attention)


class UNetShallowWrapper(nn.Module):
    """The UNet's outer blocks on a cached feature (``apla_train.deepcache``)."""

    def __init__(self, unet: nn.Module, branch: int, fused_attention: bool = False):
        super().__init__()
        self.unet = unet
        self.branch = branch
        self.fused_attention = fused_attention

    def forward(self, sample, timestep, encoder_hidden_states, feature):
        return unet_shallow(self.unet, sample, timestep, encoder_hidden_states, feature, self.branch,
                            self.fused_attention)


class VGTWrapper(nn.Module):
    def __init__(self, vgt: nn.Module):
        super().__init__()
        self.vgt = vgt

    def forward(self, sample, timestep, *source):
        return self.vgt(sample, timestep, *source)


class VAEDecoderWrapper(nn.Module):
    """Scaled latents (frames, c, h, w) -> images (frames, 3, H, W) in [-1, 1]."""

    def __init__(self, codec: nn.Module):
        super().__init__()
        self.codec = codec

    def forward(self, latent):
        return self.codec.decode(latent)


class VAEEncoderWrapper(nn.Module):
    """Images (frames, 3, H, W) in [-1, 1] -> scaled latents (posterior mean)."""

    def __init__(self, codec: nn.Module):
        super().__init__()
        self.codec = codec

    def forward(self, image):
        return self.codec.encode(image)


def _tensor(name: str, dtype: str, dims: list) -> TensorSpec:
    return TensorSpec(name, np.dtype(dtype), tuple(dims))


@dataclass
class NetworkExport:
    """How one network is exported: its contract (the manifest's ``NetworkSpec``, without
    files yet), the module traced, its example inputs and the shapes it is validated at."""

    contract: NetworkSpec
    module: nn.Module
    validate_at: list[dict[str, int]] = field(default_factory=list)  # dim sizes; first = traced
    make_input: Callable[[TensorSpec, tuple[int, ...], torch.Generator], torch.Tensor] | None = None
    # an ONNX Runtime flavour of the same network (fused com.microsoft attention), exported
    # next to the portable ONNX that TensorRT builds from
    ort_module: nn.Module | None = None
    # shapes for validating the portable ONNX when it has an ort_module and the full shapes
    # would not fit: its decomposed attention materialises (queries x keys) per head
    portable_validate_at: list[dict[str, int]] | None = None
    # the stem of an external-data file that this network's graphs share with others (the
    # UNet family: ``unet``, ``unet_feature``, ``unet_shallow`` all point into unet.onnx.data,
    # whatever the model's size); None: ``<name>.onnx.data``, and only over 2 GB
    weights: str | None = None

    @classmethod
    def build(cls, name: str, module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec],
              profile: dict[str, list[int]], tolerance: dict[str, float], validate_at: list[dict[str, int]],
              make_input: Callable, **kwargs: Any) -> "NetworkExport":
        contract = NetworkSpec(name, None, None, (), tuple(inputs), tuple(outputs), profile, tolerance)
        return cls(contract, module, validate_at, make_input, **kwargs)

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.contract.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.contract.outputs

    @property
    def profile(self) -> Mapping[str, Any]:
        """Named dim -> [min, opt, max]."""
        return self.contract.profile

    @property
    def tolerance(self) -> Mapping[str, Any]:
        """ORT fp32 vs PyTorch: max_abs."""
        return self.contract.tolerance

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def example(self, sizes: dict[str, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
        assert self.make_input is not None
        gen = torch.Generator().manual_seed(seed)
        return tuple(self.make_input(t, t.shape(sizes), gen) for t in self.inputs)


def default_input(vocab: int, max_t: int) -> Callable:
    def make(spec: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        if spec.name == "input_ids":
            return torch.randint(0, vocab, shape, generator=gen)
        if spec.name == "timestep":
            return torch.randint(0, max_t, shape, generator=gen)
        if spec.name == "image":
            return torch.rand(shape, generator=gen) * 2 - 1
        return torch.randn(shape, generator=gen)
    return make


ATTENTION_BYTES_LIMIT = 2 * 1024**3


def _small_unet_shapes(components, h: int, fmin: int, fmax: int) -> list[dict[str, int]] | None:
    """Validation shapes for the portable UNet when the full ones would need more than
    ``ATTENTION_BYTES_LIMIT`` for one sparse-causal score matrix (SD: 64x64 latents)."""
    heads = max(int(b.attn1.heads) for b in components.unet.transformer_blocks())
    per_frame = heads * (h * h) * (2 * h * h) * 4  # fp32 scores of one frame's attn1
    if 2 * fmax * per_frame <= ATTENTION_BYTES_LIMIT:
        return None
    small = [max(fmin, min(fmax, n)) for n in (2, 3)]
    return [{"batch": 1, "frames": small[0], "height": h, "width": h},
            {"batch": 2, "frames": small[1], "height": h, "width": h}]


def network_specs(components, vgt, cfg, frames: tuple[int, int, int],
                  cache_branch: int | None = None) -> list[NetworkExport]:
    """The networks of a run with their contracts; ``frames`` = (min, opt, max).

    ``cache_branch`` (an ``apla_train.deepcache`` branch) adds the two DeepCache graphs,
    ``unet_feature`` and ``unet_shallow``, which share the UNet's weight file."""
    codec = components.codec
    c = codec.latent_channels
    h = cfg.data.size // codec.downsample
    size = cfg.data.size
    seq = int(components.tokenizer.model_max_length)
    hidden = int(components.text_encoder.config.hidden_size)
    vocab = int(components.text_encoder.config.vocab_size)
    make = default_input(vocab, components.scheduler.num_train_timesteps)
    fmin, fopt, fmax = frames
    # frame counts other than the traced one, inside the profile: 3 and 12 where possible
    others = sorted({max(fmin, min(fmax, n)) for n in (3, 12)} - {fopt}) or [fmin]
    other, other2 = others[0], others[-1]
    latent = ["batch", c, "frames", "height", "width"]
    hw = {"height": [h, h, h], "width": [h, h, h]}
    big = size >= 256  # SD-scale networks get looser fp32 tolerances
    specs = [
        NetworkExport.build("text_encoder", TextEncoderWrapper(components.text_encoder),
                            [_tensor("input_ids", "int64", ["batch", seq])],
                            [_tensor("last_hidden_state", "float32", ["batch", seq, hidden])],
                            {"batch": [1, 2, 2]}, {"max_abs": 1e-4 if not big else 1e-3},
                            [{"batch": 2}, {"batch": 1}], make),
        NetworkExport.build("unet", UNetWrapper(components.unet),
                            [_tensor("sample", "float32", latent), _tensor("timestep", "int64", ["batch"]),
                             _tensor("encoder_hidden_states", "float32", ["batch", seq, hidden])],
                            [_tensor("noise_pred", "float32", latent)],
                            {"batch": [1, 2, 2], "frames": [fmin, fopt, fmax], **hw},
                            {"max_abs": 1e-4 if not big else 2e-3},
                            [{"batch": 2, "frames": fopt, "height": h, "width": h},
                             {"batch": 1, "frames": other, "height": h, "width": h},
                             {"batch": 2, "frames": other2, "height": h, "width": h}], make,
                            ort_module=UNetWrapper(components.unet, fused_attention=True),
                            portable_validate_at=_small_unet_shapes(components, h, fmin, fmax)),
    ]
    if cache_branch is not None:
        specs[1].weights = "unet"  # one weight file for the three UNet graphs, at any size
        specs += _cache_specs(components, specs[1], cache_branch, h)
    if vgt is not None:
        vgt_inputs = [_tensor("sample", "float32", ["batch", c, "frames", h, h]),
                      _tensor("timestep", "int64", ["batch"])]
        if cfg.vgt.source:
            vgt_inputs.append(_tensor("source", "float32", ["batch", c, "frames", h, h]))
        vgt_frames = [fmin, fopt, min(fmax, cfg.vgt.max_frames)]
        specs.append(NetworkExport.build("vgt", VGTWrapper(vgt), vgt_inputs,
                                         [_tensor("delta", "float32", ["batch", c, "frames", h, h])],
                                         {"batch": [1, 1, 2], "frames": vgt_frames},
                                         {"max_abs": 1e-4},
                                         [{"batch": 1, "frames": fopt}, {"batch": 1, "frames": other},
                                          {"batch": 2, "frames": other2}], make))
    img = ["frames", 3, "image_height", "image_width"]
    lat = ["frames", c, "height", "width"]
    # the runtime decodes/encodes at most DECODE_CHUNK frames per call: the VAE profile stops there
    dec_max = min(fmax, DECODE_CHUNK)
    dec_frames = [1, min(fopt, dec_max), dec_max]
    other = min(other, dec_max)
    img_hw = {"image_height": [size, size, size], "image_width": [size, size, size]}
    specs.append(NetworkExport.build("vae_decoder", VAEDecoderWrapper(codec), [_tensor("latent", "float32", lat)],
                                     [_tensor("image", "float32", img)],
                                     {"frames": dec_frames, **hw}, {"max_abs": 1e-4 if not big else 5e-3},
                                     [{"frames": dec_frames[1], "height": h, "width": h},
                                      {"frames": other, "height": h, "width": h}], make))
    specs.append(NetworkExport.build("vae_encoder", VAEEncoderWrapper(codec), [_tensor("image", "float32", img)],
                                     [_tensor("latent", "float32", lat)],
                                     {"frames": dec_frames, **img_hw}, {"max_abs": 1e-4 if not big else 5e-3},
                                     [{"frames": dec_frames[1], "image_height": size, "image_width": size},
                                      {"frames": other, "image_height": size, "image_width": size}], make))
    return specs


def _cache_specs(components, unet_spec: NetworkExport, branch: int, h: int) -> list[NetworkExport]:
    """``unet_feature`` (the UNet + the cached branch's feature) and ``unet_shallow`` (the
    outer blocks on it): the UNet's inputs, profile, tolerance and validation shapes, and
    its weight file."""
    unet = components.unet
    channels, size = feature_dims(unet, branch, h)
    spatial: list = ["height", "width"] if size == h else [size, size]
    feature = _tensor("feature", "float32", ["batch", channels, "frames", *spatial])
    noise = unet_spec.outputs[0]
    profile, tolerance = dict(unet_spec.profile), dict(unet_spec.tolerance)
    assert unet_spec.make_input is not None
    return [
        NetworkExport.build("unet_feature", UNetFeatureWrapper(unet, branch), list(unet_spec.inputs),
                            [noise, feature], profile, tolerance, list(unet_spec.validate_at),
                            unet_spec.make_input, ort_module=UNetFeatureWrapper(unet, branch, fused_attention=True),
                            portable_validate_at=unet_spec.portable_validate_at, weights="unet"),
        NetworkExport.build("unet_shallow", UNetShallowWrapper(unet, branch),
                            [*unet_spec.inputs, feature], [noise], profile, tolerance,
                            list(unet_spec.validate_at), unet_spec.make_input,
                            ort_module=UNetShallowWrapper(unet, branch, fused_attention=True),
                            portable_validate_at=unet_spec.portable_validate_at, weights="unet"),
    ]
