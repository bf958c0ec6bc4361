"""Write a Stable-Diffusion-1.5-shaped, randomly initialised diffusers folder.

    python benchmarks/make_sd_shaped.py OUT [--seed 0] [--force]

The folder has SD 1.5's architecture without its weights, so that train -> export -> generate
can be measured at the real model size on a machine that cannot download weights:

* ``unet/``: ``UNet2DConditionModel`` with SD 1.5's config (859,520,964 parameters);
* ``vae/``: ``AutoencoderKL`` with SD's config (scaling factor 0.18215);
* ``text_encoder/``: a CLIP ViT-L/14-shaped ``CLIPTextModel`` (12 layers, width 768, CLIP's
  49,408-token embedding table) over the project's byte-level tokenizer (its ids are a subset
  of the table);
* ``tokenizer/``: the byte-level CLIP tokenizer (``apla_train.components``);
* ``scheduler/``: SD's DDIM settings (scaled_linear 0.00085..0.012, steps_offset 1).

Weights are safetensors. Each network is built from a fixed seed with the libraries' default
initialisation (the same bytes on every run with the same torch), except the layers that end a
residual branch or a network, which are scaled down so that activations stay O(1) through the
deep random stacks instead of growing block by block. Networks are built, saved and freed one
at a time (peak memory ~ one UNet, 3.5 GB).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768,
}
SD_DDIM = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "timestep_spacing": "leading", "trained_betas": None,
}
UNET_PARAMETERS = 859_520_964
# output projections of residual branches (and of the networks): scaled by this at init
RESIDUAL_OUT_SCALE = 0.2


def _damp_residual_outputs(model, names: tuple[str, ...]) -> None:
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(names) and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.mul_(RESIDUAL_OUT_SCALE)


def build_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    n = sum(p.numel() for p in unet.parameters())
    if n != UNET_PARAMETERS:
        raise SystemExit(f"the UNet has {n:,} parameters, SD 1.5's has {UNET_PARAMETERS:,}")
    # resnets' conv2, attention/transformer out projections, the UNet's conv_out
    _damp_residual_outputs(unet, ("conv2", "proj_out", "to_out.0", "ff.net.2", "conv_out"))
    return unet


def build_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD_VAE)
    _damp_residual_outputs(vae, ("conv2", "to_out.0"))
    return vae


def build_text_encoder(seed: int, tokenizer):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 2)
    cfg = CLIPTextConfig(**CLIP_L_TEXT, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg).eval()


def write(out: Path, seed: int = 0) -> None:
    """Build each network, save it (safetensors) into ``out``, free it; then the rest."""
    from apla_train.components import byte_level_clip_tokenizer

    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as src:
        tokenizer = byte_level_clip_tokenizer(Path(src))
        tokenizer.save_pretrained(out / "tokenizer")
    text = build_text_encoder(seed, tokenizer)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    del text
    gc.collect()
    vae = build_vae(seed)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    del vae
    gc.collect()
    unet = build_unet(seed)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    del unet
    gc.collect()
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_DDIM, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "note": "SD-1.5-shaped random weights (apla benchmarks)",
        "seed": seed}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write (must not exist, unless --force)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    args = ap.parse_args(argv)
    if args.out.exists():
        if not args.force:
            print(f"{args.out} exists; pass --force to replace it", file=sys.stderr)
            return 1
        shutil.rmtree(args.out)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp, args.seed)
    tmp.rename(args.out)
    print(f"SD-1.5-shaped folder written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
