"""``apla-rt``: thin click commands over ``apla_rt.pipeline`` (generate, invert, info).

Every ``AplaError`` is printed as ``error: <one line>`` on stderr with exit code 2 and no
traceback; outputs are never replaced without ``--force``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from .errors import AplaError, reported_to_user
from .runners import BACKEND_HELP, BACKENDS

_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``AplaError`` into ``error: <message>`` and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with reported_to_user(interrupted="nothing was written"):
            return func(*args, **kwargs)

    return wrapper


@click.group(context_settings=_CONTEXT)
def main() -> None:
    """Sample APLA text-to-video models from an exported engine folder (no torch)."""


_engine_dir = click.option("--engine-dir", required=True, type=click.Path(path_type=Path),
                           help="Engine folder written by apla-export (holds manifest.json).")
_backend = click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                        help=BACKEND_HELP)
_threads = click.option("--threads", type=int, default=None,
                        help="CPU threads for ONNX Runtime (default: its own choice); with 2 "
                             "or more, generate runs the UNet's two guidance halves side by side.")


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise AplaError(f"--threads must be at least 1, got {threads}")


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--prompt", required=True, help="What the video shows, e.g. 'a man is skiing'.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Video file: .mp4 or .gif.")
@click.option("--frames", type=int, help="Frames to generate (default: the start latent's).")
@click.option("--steps", type=int, help="DDIM steps, 1..1000 (default: the run's, 50 for SD runs).")
@click.option("--guidance", type=float,
              help="Classifier-free guidance scale (default: the run's, 12.5 for SD runs).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Noise seed (--from-noise), 0 or more.")
@click.option("--negative-prompt", default="", help="The unconditional prompt (default: empty).")
@click.option("--no-vgt", is_flag=True, help="Leave out the VGT perturbation (Tune-A-Video).")
@click.option("--from-noise", is_flag=True,
              help="Start from seeded Gaussian noise instead of the inverted training clip.")
@click.option("--latent", type=click.Path(path_type=Path), help="Start from this latent (.npy).")
@_backend
@_threads
@click.option("--fps", type=float, help="Frame rate of the video (default: the run's).")
@click.option("--timings", is_flag=True, help="Print the time spent per stage.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary line.")
@_user_errors
def generate(engine_dir: Path, prompt: str, out: Path, frames: int | None, steps: int | None,
             guidance: float | None, seed: int, negative_prompt: str, no_vgt: bool, from_noise: bool,
             latent: Path | None, backend: str, threads: int | None, fps: float | None,
             timings: bool, force: bool, quiet: bool) -> None:
    """Generate a video for --prompt with the model in --engine-dir."""
    from .pipeline import generate as run_generate

    _check_threads(threads)
    if fps is not None and not 0 < fps <= 240:
        raise AplaError(f"--fps must be in (0, 240], got {fps}")
    if not prompt.strip():
        raise AplaError("--prompt must not be empty")
    result = run_generate(engine_dir, prompt, out, frames=frames, steps=steps, guidance=guidance,
                          seed=seed, negative_prompt=negative_prompt, use_vgt=not no_vgt,
                          from_noise=from_noise, latent=latent, backend=backend, threads=threads,
                          fps=fps, force=force, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {result.path}: {result.frames.shape[0]} frames of "
                   f"{result.frames.shape[2]}x{result.frames.shape[1]}, {result.steps} steps, "
                   f"guidance {result.guidance:g}, VGT {'on' if result.vgt else 'off'}, "
                   f"backend {result.backend}", err=True)
    if timings:
        click.echo(result.timings.table())


@main.command(context_settings=_CONTEXT)
@click.argument("video", type=click.Path(path_type=Path))
@_engine_dir
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Latent file (.npy).")
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM inversion steps.")
@click.option("--frames", type=int, help="Frames to read (default: the start latent's count).")
@click.option("--start", type=int, help="First frame (default: the run's).")
@click.option("--stride", type=int, help="Read every N-th frame (default: the run's).")
@click.option("--no-vgt", is_flag=True, help="Invert without the VGT perturbation.")
@_backend
@_threads
@click.option("--timings", is_flag=True, help="Print the time spent per stage.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary line.")
@_user_errors
def invert(video: Path, engine_dir: Path, out: Path, steps: int, frames: int | None,
           start: int | None, stride: int | None, no_vgt: bool, backend: str,
           threads: int | None, timings: bool, force: bool, quiet: bool) -> None:
    """DDIM-invert VIDEO into a start latent for `generate --latent`."""
    from .pipeline import invert as run_invert

    _check_threads(threads)
    result = run_invert(video, engine_dir, out, steps=steps, frames=frames, start=start,
                        stride=stride, use_vgt=not no_vgt, backend=backend, threads=threads,
                        force=force, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {result.path}: latent {list(result.latent.shape)}, {steps} steps, "
                   f"backend {result.backend}", err=True)
    if timings:
        click.echo(result.timings.table())


def _dims(dims: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_user_errors
def info(engine_dir: Path, verify: bool, as_json: bool) -> None:
    """Show the networks, dims, profiles, prompt, files and versions of an engine folder."""
    from .manifest import Manifest
    from .runners import select_backend

    manifest = Manifest.open(engine_dir)
    if verify:
        manifest.verify()
    if as_json:
        click.echo(json.dumps(manifest.data, indent=2))
        return
    out = [f"engine folder {manifest.root}  (manifest format {manifest.data['format_version']})",
           f"prompt: {manifest.prompt!r}"]
    shape = manifest.start_latent_shape()
    out.append(f"start latent: {manifest.rel(manifest.start_latent_path)} {list(shape)}"
               if manifest.start_latent_path is not None and shape is not None else "start latent: none")
    lo, opt, hi = manifest.frame_range()
    out.append(f"frames: {lo}..{hi} (opt {opt}); latent {manifest.latent_size()}, "
               f"{manifest.latent_channels} channels, VAE x{manifest.vae_downsample}, "
               f"scaling {manifest.vae_scaling_factor:g}; fps {manifest.fps:g}")
    sched = manifest.scheduler
    out.append(f"scheduler: DDIM, {sched.beta_schedule} {sched.beta_start:g}..{sched.beta_end:g}, "
               f"{sched.num_train_timesteps} steps, {sched.timestep_spacing} spacing, "
               f"offset {sched.steps_offset}")
    out.append("networks:")
    for name, spec in manifest.networks.items():
        files = ", ".join(manifest.rel(p) for p in (spec.onnx, spec.onnx_ort, spec.engine) if p is not None)
        out.append(f"  {name}  [{files}]")
        for t in spec.inputs:
            out.append(f"    in  {t.name:<22} {str(t.dtype):<8} {_dims(t.dims)}")
        for t in spec.outputs:
            out.append(f"    out {t.name:<22} {str(t.dtype):<8} {_dims(t.dims)}")
        out.append("    profile " + ", ".join(f"{d} {r[0]}..{r[2]} (opt {r[1]})"
                                             for d, r in spec.profile.items()))
    try:
        chosen, why = select_backend("auto", manifest, tuple(manifest.networks))
        out.append(f"backend (auto): {chosen} ({why})")
    except AplaError as err:
        out.append(f"backend (auto): unavailable ({err})")
    out.append("files:" + (" (sha256 verified)" if verify else ""))
    out += [f"  {rel}  {digest[:16]}" for rel, digest in manifest.files.items()]
    if manifest.checkpoint_sha256:
        out.append(f"checkpoint sha256: {manifest.checkpoint_sha256}")
    if manifest.versions:
        out.append("versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    click.echo("\n".join(out))


if __name__ == "__main__":
    main()
