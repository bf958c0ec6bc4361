"""Where a video's sampling starts: its start latent, the timestep that latent belongs to, and
the clean latents a ``vgt.source`` VGT reads (``Latent``).

Every video starts from one of:

* the engine folder's start latent (the DDIM-inverted training clip), at the manifest's
  ``start_timestep``;
* seeded Gaussian noise (``from_noise``, or a folder without a start latent), at T - 1;
* a latent from ``Pipeline.invert`` (a ``Latent``, which carries its timestep and clean
  latents) or an array;
* a ``NAME.npy`` file from ``apla-rt invert``, at the ``timestep`` that ``NAME.json`` beside
  it records; its clean latents in ``NAME.source.npy`` (``save_latent`` writes all three).

A latent whose timestep is not recorded (folders and files from before it was) is taken to be
a DDIM inversion with the run's ``sample.inversion_steps`` (``fallback_timestep``). A VGT that
reads the clean source latent gets the edited clip's clean latents: the training clip's (the
manifest's ``source_latent``) for its start latent and for noise, the new clip's for an
inverted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import InputError
from ..sampling.solvers import check_start_timestep, inverted_timestep, noise_timestep
from .atomic import check_writable, write_file, write_text
from .jsonfile import read_json_object
from .manifest import Manifest, check_latent, load_npy


@dataclass(frozen=True)
class Latent:
    """A start latent (1, c, f, h, w), the clean latents of the clip it came from and the
    timestep it belongs to (None: unknown, taken as the run's inversion's)."""

    start: np.ndarray
    clean: np.ndarray | None = None
    timestep: int | None = None


GivenLatent = Union[Latent, np.ndarray, str, os.PathLike, None]


def source_path_for(latent_path: str | os.PathLike) -> Path:
    """Where the clean latents of an inverted clip sit next to its start latent."""
    return _sibling(latent_path, ".source.npy")


def timestep_path_for(latent_path: str | os.PathLike) -> Path:
    """Where the timestep of a start latent ``NAME.npy`` is recorded: ``NAME.json`` beside it,
    ``{"timestep": t, "inversion_steps": n}``."""
    return _sibling(latent_path, ".json")


def _sibling(latent_path: str | os.PathLike, suffix: str) -> Path:
    path = Path(latent_path)
    stem = path.name[:-len(".npy")] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + suffix)


def check_frames(frames: Any, manifest: Manifest, flag: str = "--frames") -> int:
    """A frame count within every network's profile."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise InputError(f"{flag} must be an integer >= 1, got {frames!r}")
    lo, _opt, hi = manifest.frame_range()
    if not lo <= frames <= hi:
        raise InputError(f"{flag} {frames} is outside the engines' range {lo}..{hi} (frames)")
    return int(frames)


def fallback_timestep(manifest: Manifest) -> int:
    """The timestep of a start latent that records none: a DDIM inversion with the run's
    inversion steps (how such latents were made), else seeded noise's."""
    steps = manifest.inversion_steps()
    if steps is None:
        return noise_timestep(manifest.scheduler)
    return inverted_timestep(manifest.scheduler, steps)


def folder_start_timestep(manifest: Manifest) -> int:
    """The timestep of the engine folder's start latent: the manifest's ``start_timestep``,
    else ``fallback_timestep``."""
    if manifest.start_timestep is not None:
        return manifest.start_timestep
    return fallback_timestep(manifest)


def file_timestep(manifest: Manifest, latent_path: str | os.PathLike) -> int:
    """The timestep recorded beside a ``.npy`` start latent (``timestep_path_for``)."""
    path = timestep_path_for(latent_path)
    if not path.is_file():
        return fallback_timestep(manifest)
    value = read_json_object(path).get("timestep")
    return check_start_timestep(manifest.scheduler, value, f"timestep in {path}")


class StartLatents:
    """Resolves each video's ``Latent`` for one engine folder (module docstring); the folder's
    own latents are read once. ``reads_source``: the VGT that runs reads clean latents."""

    def __init__(self, manifest: Manifest, reads_source: bool):
        self.manifest = manifest
        self.reads_source = reads_source
        self._start: np.ndarray | None = None
        self._clean: np.ndarray | None = None

    def resolve(self, frames: int | None, seed: int, from_noise: bool, latent: GivenLatent) -> Latent:
        """The start of one video: ``latent`` if given, else noise or the folder's latent."""
        if latent is not None and from_noise:
            raise InputError("--latent and --from-noise exclude each other; give one")
        if isinstance(latent, (str, os.PathLike)):
            start = self._from_file(Path(latent), frames)
        elif latent is not None:
            start = self._given(latent if isinstance(latent, Latent) else Latent(latent), frames)
        elif from_noise or self.manifest.start_latent_path is None:
            if not from_noise:
                raise InputError(f"the engine folder {self.manifest.root} has no start latent; "
                                 "pass --from-noise (or --latent FILE.npy)")
            start = Latent(self._noise(frames, seed), None, noise_timestep(self.manifest.scheduler))
        else:
            start = self._folders(frames)
        if self.reads_source and start.clean is None:
            start = Latent(start.start, self._training_clean(start.start), start.timestep)
        return start if self.reads_source else Latent(start.start, None, start.timestep)

    def _given(self, given: Latent, frames: int | None) -> Latent:
        m = self.manifest
        z = self._check_frames(check_latent(given.start, m.latent_channels, "the given latent"),
                               frames, "the given latent")
        timestep = (check_start_timestep(m.scheduler, given.timestep, "given latent's timestep")
                    if given.timestep is not None else fallback_timestep(m))
        clean = None
        if self.reads_source:
            if given.clean is None:
                raise InputError("this model's VGT reads the clean latent of the clip being "
                                 "edited; pass the Latent that invert returned, or use_vgt=False")
            clean = self._check_clean(given.clean, z, "the given latent's clean latent")
        return Latent(z, clean, timestep)

    def _from_file(self, path: Path, frames: int | None) -> Latent:
        m = self.manifest
        z = self._check_frames(check_latent(load_npy(path), m.latent_channels, f"--latent {path}"),
                               frames, f"--latent {path}")
        clean = None
        if self.reads_source:
            source = source_path_for(path)
            if not source.is_file():
                raise InputError(f"this model's VGT reads the clean latent of the clip that "
                                 f"--latent {path} was inverted from; apla-rt invert writes "
                                 f"it next to the latent as {source} (missing); or pass --no-vgt")
            clean = self._check_clean(load_npy(source), z, str(source))
        return Latent(z, clean, file_timestep(m, path))

    def _noise(self, frames: int | None, seed: int) -> np.ndarray:
        m = self.manifest
        n = check_frames(frames, m) if frames is not None else m.frame_range()[1]
        h, w = m.latent_size()
        rng = np.random.default_rng(seed)
        return rng.standard_normal((1, m.latent_channels, n, h, w)).astype(np.float32)

    def _folders(self, frames: int | None) -> Latent:
        """The engine folder's start latent, whose frame count ``--frames`` must equal."""
        m = self.manifest
        shape = m.start_latent_shape()
        assert shape is not None
        if frames is not None:
            check_frames(frames, m)
            if frames != shape[2]:
                raise InputError(f"--frames {frames} differs from the {shape[2]} frames of the "
                                 f"engine folder's start latent; pass --from-noise to start from noise")
        if self._start is None:
            self._start = m.load_start_latent()
        return Latent(self._start, None, folder_start_timestep(m))

    def _training_clean(self, z: np.ndarray) -> np.ndarray:
        if self._clean is None:
            self._clean = self.manifest.load_source_latent()
        if self._clean.shape != z.shape:
            raise InputError(f"this model's VGT reads the training clip's latent "
                             f"{list(self._clean.shape)}; a start latent of {list(z.shape)} "
                             f"cannot use it: keep the clip's frame count or pass --no-vgt")
        return self._clean

    def _check_frames(self, z: np.ndarray, frames: int | None, what: str) -> np.ndarray:
        """A given start latent against ``--frames`` and the engines' frame range."""
        if frames is not None and frames != z.shape[2]:
            raise InputError(f"--frames {frames} differs from the {z.shape[2]} frames of {what}; "
                             "drop --frames or pass --from-noise")
        check_frames(z.shape[2], self.manifest, "the latent's frame count")
        return z

    def _check_clean(self, clean: Any, start: np.ndarray, what: str) -> np.ndarray:
        clean = check_latent(clean, self.manifest.latent_channels, what)
        if clean.shape != start.shape:
            raise InputError(f"{what} has shape {list(clean.shape)}, the start latent "
                             f"{list(start.shape)}; invert the clip again")
        return clean


def check_latent_outputs(out: str | os.PathLike, with_source: bool, force: bool) -> None:
    """``save_latent``'s files may be written (before any work is done)."""
    check_writable(out, force)
    check_writable(timestep_path_for(out), force)
    if with_source:
        check_writable(source_path_for(out), force)


def save_latent(latent: Latent, out: str | os.PathLike, inversion_steps: int, *,
                with_source: bool, force: bool = False) -> list[Path]:
    """Write an inverted ``latent`` as ``out`` (.npy), its timestep beside it (``NAME.json``)
    and, ``with_source``, its clean latents (``NAME.source.npy``); each file atomically, the
    latent last. The paths written, the latent's first."""
    assert latent.timestep is not None
    written = []
    if with_source:
        assert latent.clean is not None
        written.append(_save_npy(source_path_for(out), latent.clean, force))
    written.append(write_text(timestep_path_for(out), json.dumps(
        {"timestep": latent.timestep, "inversion_steps": inversion_steps}) + "\n", force=force))
    return [_save_npy(out, latent.start, force)] + written


def _save_npy(out: str | os.PathLike, array: np.ndarray, force: bool) -> Path:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return write_file(out, save, force=force)
