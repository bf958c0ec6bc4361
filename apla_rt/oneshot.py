"""The CLI's one-call ``generate`` and ``invert``: open an engine folder, run one
``apla_rt.api.Pipeline`` call, write the result atomically. Above the API, which is above the
sampling loop (``apla_rt.engine``): each imports only what is below it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .api import Pipeline, source_path_for, timestep_path_for
from .folder.atomic import check_writable, write_file, write_text
from .errors import InputError
from .engine import StepCallback, Timings, check_guidance, check_steps
from .sampling.solvers import check_guidance_interval, check_solver
from .media.video import WRITE_SUFFIXES, write_video


@dataclass
class GenerateResult:
    frames: np.ndarray  # uint8 (f, H, W, 3)
    latents: np.ndarray  # final latents (1, c, f, h, w)
    start: np.ndarray  # the start latent
    path: Path | None
    timings: Timings
    backend: str
    vgt: bool  # whether the VGT perturbation was added
    steps: int = 0  # the steps and guidance actually used
    guidance: float = 0.0
    notes: tuple[str, ...] = ()  # bf16 checks that missed (those networks ran fp32)


def progress_bar(enabled: bool, total: int, desc: str) -> tuple[StepCallback | None, Callable[[], None]]:
    """(step callback, close) of a tqdm bar over ``total`` steps; (None, no-op) when disabled."""
    if not enabled:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    return (lambda i, t: bar.update(1)), bar.close


def generate(engine_dir: str | os.PathLike, prompt: str, out: str | os.PathLike | None = None, *,
             frames: int | None = None, steps: int | None = None, guidance: float | None = None,
             seed: int = 0,
             negative_prompt: str = "", use_vgt: bool = True, from_noise: bool = False,
             latent: str | os.PathLike | None = None, backend: str = "auto",
             threads: int | None = None, fps: float | None = None, force: bool = False,
             progress: bool = False, scheduler: str | None = None,
             guidance_interval: tuple[float, float] | str | None = None, cache_interval: int = 1,
             cache_schedule: str = "uniform", precision: str = "auto") -> GenerateResult:
    """Sample a video for ``prompt`` from an engine folder; write it to ``out`` (mp4/gif).

    ``steps`` and ``guidance`` default to the run's sampling settings (``sample_defaults``
    in the manifest, else its config's ``sample`` section). One ``Pipeline`` call.
    """
    if steps is not None:
        steps = check_steps(steps)
    if guidance is not None:
        guidance = check_guidance(guidance)
    if scheduler is not None:
        check_solver(scheduler)
    interval = check_guidance_interval(guidance_interval) if guidance_interval is not None else None
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise InputError("--prompt and --negative-prompt must be text")
    if out is not None:
        check_video_suffix(out)
        check_writable(out, force)
    with Pipeline.open(engine_dir, backend, threads, use_vgt=use_vgt, precision=precision) as pipe:
        callback, done = progress_bar(progress, steps or pipe.default_steps(), "sample")
        try:
            video, = pipe.generate(prompt, seeds=seed, frames=frames, steps=steps,
                                   guidance=guidance, negative_prompt=negative_prompt,
                                   from_noise=from_noise, latent=latent, callback=callback,
                                   scheduler=scheduler, guidance_interval=interval,
                                   cache_interval=cache_interval, cache_schedule=cache_schedule)
        finally:
            done()
        path = None
        if out is not None:
            with pipe.timings("video write"):
                path = write_video(out, video.frames, fps=fps or video.fps, force=force)
        return GenerateResult(video.frames, video.latents, video.start, path, pipe.timings,
                              f"{pipe.describe()}, precision {pipe.describe_precision()}",
                              video.vgt, video.steps, video.guidance, tuple(pipe.engine.notes))


def check_video_suffix(out: str | os.PathLike) -> None:
    if Path(out).suffix.lower() not in WRITE_SUFFIXES:
        raise InputError(f"cannot write {out}: unknown extension {Path(out).suffix!r}; "
                         "use .mp4 or .gif")


# --------------------------------------------------------------------------- invert


@dataclass
class InvertResult:
    latent: np.ndarray  # (1, c, f, h, w)
    clean: np.ndarray  # the VAE encoder's latents of the frames
    path: Path | None
    timings: Timings
    backend: str
    source_path: Path | None = None  # the clean latents, written for a vgt.source VGT
    steps: int = 0  # the DDIM steps used
    timestep: int = 0  # the timestep the latent belongs to (also in NAME.json beside it)
    timestep_path: Path | None = None
    notes: tuple[str, ...] = ()  # bf16 checks that missed (those networks ran fp32)


def invert(video: str | os.PathLike, engine_dir: str | os.PathLike, out: str | os.PathLike | None = None,
           *, steps: int | None = None, frames: int | None = None, start: int | None = None,
           stride: int | None = None, use_vgt: bool = True, backend: str = "auto",
           threads: int | None = None, force: bool = False, progress: bool = False,
           precision: str = "auto") -> InvertResult:
    """DDIM-invert a video with the engine folder's predictor; save the latent to ``out`` (.npy).

    ``steps`` defaults to the run's inversion steps; frames as in ``Pipeline.invert``. Where
    the model's VGT reads the clean source latent (``vgt.source``), the clip's clean latents
    are saved next to ``out`` as ``NAME.source.npy``: ``generate --latent out`` reads them.
    The latent's timestep goes beside it as ``NAME.json`` (``{"timestep", "inversion_steps"}``).
    """
    if steps is not None:
        steps = check_steps(steps)
    if out is not None:
        check_writable(out, force)
        check_writable(timestep_path_for(out), force)
    with Pipeline.open(engine_dir, backend, threads, use_vgt=use_vgt, for_inversion=True,
                       precision=precision) as pipe:
        if out is not None and pipe.vgt_reads_source:
            check_writable(source_path_for(out), force)
        steps = steps or pipe.default_inversion_steps()
        callback, done = progress_bar(progress, steps, "invert")
        try:
            inverted = pipe.invert(video, steps=steps, frames=frames, start=start, stride=stride,
                                   callback=callback)
        finally:
            done()
        assert inverted.clean is not None  # invert always keeps the clip's clean latents
        assert inverted.timestep is not None
        path = source = stamp = None
        if out is not None:
            if pipe.vgt_reads_source:
                source = _save_npy(source_path_for(out), inverted.clean, force)
            stamp = write_text(timestep_path_for(out), json.dumps(
                {"timestep": inverted.timestep, "inversion_steps": steps}) + "\n", force=force)
            path = _save_npy(out, inverted.start, force)
        return InvertResult(inverted.start, inverted.clean, path, pipe.timings,
                            f"{pipe.describe()}, precision {pipe.describe_precision()}", source,
                            steps, inverted.timestep, stamp, tuple(pipe.engine.notes))


def _save_npy(out: str | os.PathLike, array: np.ndarray, force: bool) -> Path:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return write_file(out, save, force=force)
