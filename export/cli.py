"""``apla-export --run DIR [--out DIR] [--int8] ...``: a thin click command over
``pipeline.export_run``; ``apla-export --int8 --engine-dir DIR`` adds int8 models to an existing
engine folder (``int8.add_int8``)."""

from __future__ import annotations

from pathlib import Path

import click

from apla_rt.errors import AplaError, reported_to_user
from apla_rt.folder.int8 import MAX_DROP_DB, PSNR_CEILING_DB


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run", type=click.Path(path_type=Path), help="Training run folder.")
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
@click.option("--int8", is_flag=True,
              help="Also quantize the UNet graphs and the VAE decoder to int8 for OpenVINO (NNCF under "
                   "accuracy control, checked end to end against fp32; docs/export.md#int8); with "
                   "--engine-dir, add them to an existing engine folder.")
@click.option("--engine-dir", type=click.Path(path_type=Path),
              help="With --int8 (instead of --run): the existing engine folder to add int8 models to.")
@click.option("--int8-networks", help="Comma-separated networks to quantize (default: the graphs the runtime "
              "runs: unet_feature where the folder has it, else unet; unet_shallow; vae_decoder). "
              "unet names the graph that serves the UNet's calls.")
@click.option("--int8-steps", type=int, help="Sampling steps of the calibration and validation videos "
              "(default: the run's).")
@click.option("--int8-max-drop", type=float, default=MAX_DROP_DB, show_default=True,
              help=f"The fidelity budget in dB below {PSNR_CEILING_DB:g} dB PSNR against the fp32 video.")
@click.option("--int8-minutes", type=float, default=60.0, show_default=True,
              help="Accuracy control's time per network; then the model it has is measured and recorded.")
@click.option("--force", is_flag=True, help="Replace an existing engine folder (with --engine-dir: its int8 models).")
def main(run, out, fp16, backend, frames_min, frames_opt, frames_max, dynamo, cache_branch, no_cache_graphs,
         threads, int8, engine_dir, int8_networks, int8_steps, int8_max_drop, int8_minutes, force):
    """Export a training run to ONNX (validated against PyTorch) and TensorRT engines; with
    --int8 --engine-dir, add int8 models to an existing engine folder."""
    def disk(err: OSError) -> str:
        return (f"could not write the engine folder: {err.strerror} ({err.filename or out or engine_dir}); "
                "no engine folder was changed")

    with reported_to_user("no engine folder was changed", disk):
        for name, value in (("--frames-min", frames_min), ("--frames-opt", frames_opt),
                            ("--frames-max", frames_max), ("--threads", threads)):
            if value is not None and not 1 <= value <= 1024:
                raise AplaError(f"{name} must be between 1 and 1024 (got {value})")
        export_only = [flag for flag, value in (
            ("--fp16", fp16), ("--backend", backend != "auto"), ("--frames-min", frames_min),
            ("--frames-opt", frames_opt), ("--frames-max", frames_max), ("--dynamo", dynamo),
            ("--cache-branch", cache_branch != 0), ("--no-cache-graphs", no_cache_graphs)) if value]
        if engine_dir is not None and export_only:
            raise AplaError(f"{', '.join(export_only)} shape a new export; --engine-dir only adds int8 models")
        options = int8_options(run, out, engine_dir, int8, int8_networks, int8_steps, int8_max_drop,
                               int8_minutes, threads, force)
        if engine_dir is not None:
            from .int8 import add_int8

            assert options is not None
            add_int8(engine_dir, options, log=lambda m: click.echo(m, err=True))
            return
        import torch
        from transformers.utils import logging as hf_logging

        from .pipeline import export_run

        hf_logging.disable_progress_bar()  # its per-file load bars are noise on stderr
        if threads:
            torch.set_num_threads(threads)
        out = out or Path("engines") / run.resolve().name
        export_run(run, out, fp16=fp16, backend=backend, frames_min=frames_min, frames_opt=frames_opt,
                   frames_max=frames_max, force=force, dynamo=dynamo,
                   cache_branch=None if no_cache_graphs else cache_branch, int8=options,
                   log=lambda m: click.echo(m, err=True))


def int8_options(run: Path | None, out: Path | None, engine_dir: Path | None, int8: bool,
                 networks: str | None, steps: int | None, max_drop: float, minutes: float,
                 threads: int | None, force: bool):
    """The ``--int8*`` options as ``Int8Options`` (None without ``--int8``), or a one-line error
    for a combination that does not go together."""
    from .int8 import Int8Options

    if engine_dir is not None and (run is not None or out is not None):
        raise AplaError("--engine-dir adds int8 models to an existing engine folder; it does not "
                        "take --run or --out")
    if engine_dir is not None and not int8:
        raise AplaError("--engine-dir is for adding int8 models: pass --int8 with it")
    if engine_dir is None and run is None:
        raise AplaError("give --run DIR (export a training run), or --int8 --engine-dir DIR (add "
                        "int8 models to an engine folder)")
    given = [flag for flag, value in (("--int8-networks", networks), ("--int8-steps", steps))
             if value is not None]
    given += [flag for flag, value, default in (("--int8-max-drop", max_drop, MAX_DROP_DB),
                                                 ("--int8-minutes", minutes, 60.0)) if value != default]
    if not int8:
        if given:
            raise AplaError(f"{', '.join(given)}: only with --int8")
        return None
    names = None if networks is None else tuple(n.strip() for n in networks.split(",") if n.strip())
    return Int8Options(names, steps, max_drop, minutes, threads, force).check()


if __name__ == "__main__":
    main()
