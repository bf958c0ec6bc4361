"""``apla-export --run DIR [--out DIR] ...``: a thin click command over ``pipeline.export_run``."""

from __future__ import annotations

from pathlib import Path

import click

from apla_rt.errors import AplaError, reported_to_user


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run", type=click.Path(path_type=Path), required=True, help="Training run folder.")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Engine folder (default engines/<run name>).")
@click.option("--fp16", is_flag=True, help="Also write an FP16 UNet for ONNX Runtime's CUDA provider, and build FP16 "
              "TensorRT engines (where TensorRT and a CUDA GPU exist).")
@click.option("--backend", type=click.Choice(["auto", "onnx", "trt"]), default="auto", show_default=True,
              help="auto: ONNX always, engines when TensorRT is usable; onnx: ONNX only; trt: engines or fail.")
@click.option("--frames-min", type=int, help="Smallest frame count the engines accept (default 1).")
@click.option("--frames-opt", type=int, help="Frame count engines are tuned for (default: training frames).")
@click.option("--frames-max", type=int, help="Largest frame count (default max(24, 2x training frames)).")
@click.option("--dynamo", is_flag=True, help="Use torch's dynamo ONNX exporter instead of TorchScript.")
@click.option("--threads", type=int, help="CPU threads for torch and ONNX Runtime.")
@click.option("--cache-branch", type=int, default=0, show_default=True,
              help="Skip branch of the DeepCache graphs (unet_feature, unet_shallow): 0 = the "
                   "outermost, the feature entering the last up block.")
@click.option("--no-cache-graphs", is_flag=True,
              help="Leave out the DeepCache graphs (apla-rt generate --cache-interval then stays 1).")
@click.option("--force", is_flag=True, help="Replace an existing engine folder.")
def main(run, out, fp16, backend, frames_min, frames_opt, frames_max, dynamo, cache_branch, no_cache_graphs,
         threads, force):
    """Export a training run to ONNX (validated against PyTorch) and TensorRT engines."""
    def disk(err: OSError) -> str:
        return (f"could not write the engine folder: {err.strerror} ({err.filename or out}); "
                "no engine folder was changed")

    with reported_to_user("no engine folder was changed", disk):
        for name, value in (("--frames-min", frames_min), ("--frames-opt", frames_opt),
                            ("--frames-max", frames_max), ("--threads", threads)):
            if value is not None and not 1 <= value <= 1024:
                raise AplaError(f"{name} must be between 1 and 1024 (got {value})")
        import torch
        from transformers.utils import logging as hf_logging

        from .pipeline import export_run

        hf_logging.disable_progress_bar()  # its per-file load bars are noise on stderr
        if threads:
            torch.set_num_threads(threads)
        out = out or Path("engines") / run.resolve().name
        export_run(run, out, fp16=fp16, backend=backend, frames_min=frames_min, frames_opt=frames_opt,
                   frames_max=frames_max, force=force, dynamo=dynamo,
                   cache_branch=None if no_cache_graphs else cache_branch, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    main()
