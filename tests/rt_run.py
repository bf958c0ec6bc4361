"""One video, or one inverted clip, in one call: what the tests ask of the runtime most often,
over ``Pipeline`` exactly as ``apla-rt generate`` and ``apla-rt invert`` use it (open, one
``generate`` or ``invert``, write the result).

The backend defaults to ONNX Runtime fp32 on the CPU, the exact reference the tests' numbers
are held to: ``auto`` runs each network where it measured fastest on the machine (OpenVINO
fp32 or bf16 on some CPUs), whose outputs differ from the reference by more than the
tolerances of tests that compare with PyTorch; a test of that choice passes ``backend="auto"``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apla_rt import Pipeline
from apla_rt.folder.latents import check_latent_outputs, save_latent
from apla_rt.sampling.timings import Timings


@dataclass
class Generated:
    frames: np.ndarray
    latents: np.ndarray
    start: np.ndarray
    path: Path | None
    timings: Timings
    backend: str  # the runners and the precision, as the CLI prints them
    vgt: bool
    steps: int
    guidance: float
    notes: tuple[str, ...]


def generate(engine_dir: str | os.PathLike, prompt: str, out: str | os.PathLike | None = None, *,
             backend: str = "ort-cpu", threads: int | None = None, precision: str = "auto",
             use_vgt: bool = True, force: bool = False, **fields: Any) -> Generated:
    """``fields``: ``Pipeline.generate``'s (seed, frames, latent, from_noise, steps, ...)."""
    seed = fields.pop("seed", 0)
    with Pipeline.open(engine_dir, backend, threads, use_vgt=use_vgt, precision=precision) as pipe:
        video, = pipe.generate(prompt, seed, **fields)
        path = None if out is None else video.save(out, force)
        return Generated(video.frames, video.latents, video.start, path, pipe.timings,
                         f"{pipe.describe()}, precision {pipe.describe_precision()}", video.vgt,
                         video.settings.steps, video.settings.guidance, pipe.placement.notes)


@dataclass
class Inverted:
    latent: np.ndarray
    clean: np.ndarray
    timestep: int
    steps: int
    paths: list[Path]  # the latent's first
    timings: Timings
    notes: tuple[str, ...]


def invert(video: str | os.PathLike, engine_dir: str | os.PathLike,
           out: str | os.PathLike | None = None, *, backend: str = "ort-cpu",
           threads: int | None = None, precision: str = "auto", use_vgt: bool = True,
           force: bool = False, **options: Any) -> Inverted:
    """``options``: ``Pipeline.invert``'s (steps, frames, start, stride)."""
    if out is not None:
        check_latent_outputs(out, False, force)
    with Pipeline.open(engine_dir, backend, threads, use_vgt=use_vgt, for_inversion=True,
                       precision=precision) as pipe:
        steps = options.pop("steps", None) or pipe.inversion_steps()
        latent = pipe.invert(video, steps=steps, **options)
        paths = [] if out is None else save_latent(latent, out, steps, force=force,
                                                   with_source=pipe.use_vgt and pipe.vgt_reads_source)
        assert latent.clean is not None and latent.timestep is not None
        return Inverted(latent.start, latent.clean, latent.timestep, steps, paths, pipe.timings,
                        pipe.placement.notes)
