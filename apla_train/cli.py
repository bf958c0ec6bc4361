"""``apla-train VIDEO --prompt TEXT ...``: a thin click command over ``train.train``."""

from __future__ import annotations

from pathlib import Path

import click

from apla_rt.errors import AplaError, reported_to_user

from .config import AplaConfig, from_dict, load_file, merge, parse_override, tiny_preset


def build_config(video: str, prompt: str, model: str | None, pretrained: str | None,
                 config_file: str | None, overrides: tuple[str, ...], flags: dict) -> AplaConfig:
    """Defaults <- preset <- --config FILE <- --set <- first-class flags."""
    data: dict = {}
    if model == "tiny":
        data = merge(data, tiny_preset())
    if config_file:
        data = merge(data, load_file(config_file))
    for item in overrides:
        data = merge(data, parse_override(item))
    data = merge(data, {"video": video, "prompt": prompt})
    if pretrained:
        data = merge(data, {"model": {"preset": "sd", "pretrained": pretrained}})
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            data = merge(data, {section: {name: value}})
    return from_dict(data).validate()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("video", type=click.Path(dir_okay=True, path_type=str), required=False)
@click.option("--prompt", help="The training prompt describing the clip, e.g. 'a man is skiing'.")
@click.option("--pretrained", type=str,
              help="Stable Diffusion 1.x diffusers folder, or a Hugging Face repo id such as "
                   "runwayml/stable-diffusion-v1-5 (the Hub cache is used; HF_HUB_OFFLINE=1: cache only).")
@click.option("--variant", help="Weights variant of --pretrained, e.g. fp16 (*.fp16.safetensors).")
@click.option("--model", type=click.Choice(["tiny"]), help="Build the tiny CPU preset instead of --pretrained.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Run folder.")
@click.option("--steps", type=int, help="Training steps (with --resume: extend the run to this many).")
@click.option("--frames", type=int, help="Frames sampled from the clip.")
@click.option("--stride", type=int, help="Take every N-th frame.")
@click.option("--start", type=int, help="First frame.")
@click.option("--size", type=int, help="Training resolution in pixels (square).")
@click.option("--vgt", type=click.Choice(["hyper", "pure", "none"]), help="VGT variant (none = Tune-A-Video).")
@click.option("--vgt-mask", type=click.Choice(["causal", "none"]), help="none = the EN (unmasked) variants.")
@click.option("--seed", type=int)
@click.option("--config", "config_file", type=click.Path(path_type=str), help="JSON or YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config field, e.g. loss.l_adv=0.")
@click.option("--skip-nonfinite", is_flag=True, default=None, help="Skip steps with a non-finite loss or gradient.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing run folder.")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(video, prompt, pretrained, variant, model, out, steps, frames, stride, start, size, vgt, vgt_mask, seed,
         config_file, overrides, skip_nonfinite, resume, force, threads, quiet):
    """Fine-tune a text-to-video model on one VIDEO and its --prompt (APLA)."""
    def disk(err: OSError) -> str:
        return (f"could not write {err.filename or out}: {err.strerror}; the last complete "
                "checkpoint is kept (continue with --resume once there is room)")

    with reported_to_user("the last complete checkpoint is kept; continue with --resume", disk):
        import torch

        from transformers.utils import logging as hf_logging

        from .train import train

        hf_logging.disable_progress_bar()  # its per-file save/load bars are noise on stderr
        if threads is not None:
            if threads < 1:
                raise AplaError("--threads must be at least 1")
            torch.set_num_threads(threads)
        if resume:
            if not (out / "config.json").is_file():
                raise AplaError(f"--resume: {out} is not a run folder (no config.json)")
            cfg = None
        else:
            if not video:
                raise AplaError("missing VIDEO (an mp4, gif or folder of frames)")
            if not prompt or not prompt.strip():
                raise AplaError("--prompt is required and must not be empty")
            if not model and not pretrained:
                raise AplaError("give --pretrained PATH|ORG/NAME (a Stable Diffusion 1.x diffusers folder "
                                "or Hub repo id) or --model tiny")
            flags = {"train.steps": steps, "data.n_frames": frames, "data.stride": stride,
                     "data.start": start, "data.size": size, "vgt.kind": vgt, "vgt.mask": vgt_mask,
                     "train.seed": seed, "train.skip_nonfinite": skip_nonfinite, "model.variant": variant}
            cfg = build_config(video, prompt.strip(), model, pretrained, config_file, overrides, flags)
        summary = train(cfg or AplaConfig(), out, resume=resume, force=force,
                        log=lambda m: click.echo(m, err=True), progress=not quiet,
                        steps=steps if resume else None)
    if summary:
        line = (f"run written to {out}: loss {summary['loss_first10']:.4f} (first 10 steps) -> "
                f"{summary['loss_last10']:.4f} (last 10)")
        if "reconstruction_psnr_db" in summary:
            line += (f"; reconstruction PSNR {summary['reconstruction_psnr_db']:.2f} dB; "
                     f"sample in {out / 'sample.mp4'}")
        click.echo(line)


if __name__ == "__main__":
    main()
