"""The frozen and pretrained parts: tokenizer, text encoder, autoencoder, UNet, scheduler.

Two sources, one loading path:

* ``load_pretrained(path)`` reads a Stable Diffusion 1.x folder in diffusers format
  (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors or
  bin), never touching the network.
* ``build_tiny(frames)`` builds a small randomly initialised set from configs for CPU
  quickstarts and tests, with a fixed, deterministic autoencoder fitted to the clip
  (``PatchPCAAutoencoder``: a randomly initialised VAE cannot give a recognisable video).
  ``save_components`` writes it as a diffusers-format folder that ``load_pretrained``
  reads back.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apla_rt.errors import ConfigError, InputError
from apla_rt.folder.jsonfile import read_json_object
from apla_rt.sampling.schedule import SchedulerConfig

from .unet3d import UNet3DConditionModel

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ---------------------------------------------------------------------------------------
# Autoencoders


def _pca_autoencoder_cls():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class PatchPCAAutoencoder(ModelMixin, ConfigMixin):
        """A fixed linear autoencoder: PCA of p x p RGB patches, p pixels per latent cell.

        encode: pixel_unshuffle(p) then a 1x1 conv (3p^2 -> C); decode: a 1x1 conv
        (C -> 3p^2) then pixel_shuffle(p). Fitted once to the training clip, deterministic,
        exportable like any conv net.
        """

        config_name = "config.json"

        @register_to_config
        def __init__(self, patch: int = 4, latent_channels: int = 4, scaling_factor: float = 1.0):
            super().__init__()
            self.encoder = nn.Conv2d(3 * patch * patch, latent_channels, 1)
            self.decoder = nn.Conv2d(latent_channels, 3 * patch * patch, 1)

        def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(F.pixel_unshuffle(x, self.config.patch))

        def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
            return F.pixel_shuffle(self.decoder(z), self.config.patch)

    return PatchPCAAutoencoder


def fit_patch_pca(frames: np.ndarray, patch: int, channels: int = 4) -> nn.Module:
    """Fit a ``PatchPCAAutoencoder`` to uint8 frames (f, h, w, 3); latents get unit std."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 127.5 - 1.0
    if x.shape[-1] % patch or x.shape[-2] % patch:
        raise ConfigError(f"frame size {x.shape[-1]} is not a multiple of the patch size {patch}")
    patches = F.pixel_unshuffle(x, patch).permute(0, 2, 3, 1).reshape(-1, 3 * patch * patch)
    mean = patches.mean(0)
    _, _, vh = torch.linalg.svd(patches - mean, full_matrices=False)
    basis = vh[:channels]  # (C, 3p^2), orthonormal rows
    for i in range(channels):  # fix the sign of each component: deterministic across BLAS builds
        if basis[i, basis[i].abs().argmax()] < 0:
            basis[i] = -basis[i]
    latents = (patches - mean) @ basis.T
    scaling = float(1.0 / latents.std())
    model = _pca_autoencoder_cls()(patch=patch, latent_channels=channels, scaling_factor=scaling)
    with torch.no_grad():
        model.encoder.weight.copy_(basis[:, :, None, None])
        model.encoder.bias.copy_(-(basis @ mean))
        model.decoder.weight.copy_(basis.T[:, :, None, None])
        model.decoder.bias.copy_(mean)
    return model.float().eval().requires_grad_(False)


class Codec(nn.Module):
    """The autoencoder behind one interface: scaled latents <-> images in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.kind = type(vae).__name__
        self.scaling_factor = float(vae.config.scaling_factor)
        if self.kind == "PatchPCAAutoencoder":
            self.downsample = int(vae.config.patch)
        else:
            self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (n, 3, H, W) -> scaled latents; sampled from the posterior when a generator is given."""
        if self.kind == "PatchPCAAutoencoder":
            z = self.vae.encode_raw(x)
        else:
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator=generator) if generator is not None else dist.mean
        return z * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scaling_factor
        if self.kind == "PatchPCAAutoencoder":
            return self.vae.decode_raw(z)
        return self.vae.decode(z).sample


# ---------------------------------------------------------------------------------------
# Tokenizer and text


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            out.append(256 + extra)
            extra += 1
    return [chr(c) for c in out]


def byte_level_clip_tokenizer(folder: Path):
    """A CLIP tokenizer with no merges (one token per character), written offline."""
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.model_max_length = 77
    return tok


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (n, model_max_length); an over-long prompt is an error, not a silent cut."""
    max_len = tokenizer.model_max_length
    for p in prompts:
        n = len(tokenizer(p, verbose=False).input_ids)  # verbose: no transformers warning
        if n > max_len:
            raise InputError(f"prompt is too long: {n} tokens, the text encoder takes {max_len} "
                             f"(including start and end): {p[:40]!r}...")
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt").input_ids
    return ids


@torch.no_grad()
def encode_prompts(components: "Components", prompts: list[str]) -> torch.Tensor:
    device = next(components.text_encoder.parameters()).device
    ids = tokenize(components.tokenizer, prompts).to(device)
    return components.text_encoder(ids)[0]


# ---------------------------------------------------------------------------------------
# Bundles


@dataclass
class Components:
    tokenizer: Any
    text_encoder: nn.Module
    codec: Codec
    unet: UNet3DConditionModel
    scheduler: SchedulerConfig


def tiny_unet2d_config() -> dict[str, Any]:
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8)


def build_tiny(frames: np.ndarray, patch: int, seed: int, temporal: bool = True,
               widths: tuple[int, ...] = (32, 64)) -> Components:
    """Random tiny UNet + text encoder (seeded), byte-level tokenizer, PCA autoencoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet2d = UNet2DConditionModel(**{**tiny_unet2d_config(), "block_out_channels": tuple(widths)})
        with tempfile.TemporaryDirectory() as src:  # vocab files only feed the constructor
            tokenizer = byte_level_clip_tokenizer(Path(src))
        text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(text_cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    vae = fit_patch_pca(frames, patch)
    return Components(tokenizer, text_encoder.requires_grad_(False), Codec(vae),
                      UNet3DConditionModel(unet2d, temporal=temporal), SchedulerConfig())


def save_components(components: Components, folder: Path) -> None:
    """Write a diffusers-format folder (the 2D UNet, without the temporal layers)."""
    from diffusers import UNet2DConditionModel

    folder.mkdir(parents=True, exist_ok=True)
    unet2d = UNet2DConditionModel.from_config(dict(components.unet.config))
    state = {k: v for k, v in components.unet.state_dict().items() if "_temp." not in k}
    unet2d.load_state_dict(state, strict=True)
    unet2d.save_pretrained(folder / "unet")
    components.codec.vae.save_pretrained(folder / "vae")
    components.text_encoder.save_pretrained(folder / "text_encoder")
    components.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    sched = {"_class_name": "DDIMScheduler", **components.scheduler.to_dict()}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "APLAComponents"}, indent=2))


def load_pretrained(path: str | Path, temporal: bool = True, variant: str | None = None) -> Components:
    """Load an SD 1.x diffusers folder (or a saved tiny set), or a Hugging Face repo id from
    the Hub cache (``apla_train.hub``); ``variant`` picks weights such as
    ``*.fp16.safetensors`` (found by itself when a folder holds only those). The networks are
    float32 whatever the stored dtype (training keeps FP32 master weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .hub import resolve_pretrained, weights_variant

    root = resolve_pretrained(path, variant)
    if not root.is_dir():
        raise InputError(f"--pretrained {root} is not a folder (expected a Stable Diffusion 1.x "
                         f"diffusers folder with {', '.join(SUBFOLDERS)})")
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise InputError(f"--pretrained {root} lacks {', '.join(missing)}/ (expected a diffusers "
                         f"Stable Diffusion 1.x folder)")
    sched = SchedulerConfig.from_dict(read_json_object(root / "scheduler" / "scheduler_config.json"))
    variant = weights_variant(root, variant)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True,
                                                     variant=variant).float()
        vae_cfg = read_json_object(root / "vae" / "config.json")
        if vae_cfg.get("_class_name") == "PatchPCAAutoencoder":
            vae = _pca_autoencoder_cls().from_pretrained(root / "vae", local_files_only=True, variant=variant)
        else:
            vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, variant=variant).float()
        unet2d, info = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True,
                                                            output_loading_info=True, variant=variant)
        unet2d = unet2d.float()
    except (OSError, ValueError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load --pretrained {root}: {first}") from err
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise InputError(f"--pretrained {root}/unet does not match an SD 1.x UNet: "
                         + "; ".join(f"{k}: {len(v)} (e.g. {list(v)[0]})" for k, v in bad.items()))
    unet = UNet3DConditionModel(unet2d, temporal=temporal)
    return Components(tokenizer, text_encoder.eval().requires_grad_(False),
                      Codec(vae.eval().requires_grad_(False)), unet, sched)
