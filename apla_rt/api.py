"""The Python API (torch-free): open an engine folder once, generate videos in batches,
invert new clips for editing. The CLI and ``apla-rt serve`` both go through it.

    from apla_rt import Pipeline
    pipe = Pipeline.open("engines/ski", backend="auto", threads=None)   # verifies once
    videos = pipe.generate(["a man is skiing", "a panda is skiing"], seeds=[1, 2])
    videos[0].frames          # uint8 (f, H, W, 3)
    videos[0].save("a.mp4")   # or .gif; videos[0].encode("mp4") gives the bytes
    latent = pipe.invert("new-clip.mp4")
    edited = pipe.generate("a panda is skiing", latent=latent)

``generate`` pairs prompts with seeds (a single prompt or seed is used for every video) and
runs the videos through the networks together, ``max_batch`` videos per call (default: what
the UNet's profile takes: half its batch range, two rows per video for guidance). Seeds
matter when starting from noise (``from_noise``); otherwise every video starts from the
engine folder's inverted training clip, or from ``latent``.

Sampling: ``scheduler`` picks the solver (``apla_rt.sampling.solvers``: ddim, dpmpp-2m, unipc; default
the run's ``sample.scheduler``); ``guidance_interval=(lo, hi)`` guides step i of N only where
lo <= i / N < hi (the other steps run the UNet on the conditional rows only, half the cost).
Every start latent carries the timestep it belongs to: seeded noise T - 1, the engine folder's
start latent the manifest's ``start_timestep``, a ``Latent`` from ``invert`` its ``timestep``,
a ``.npy`` the ``timestep`` of the ``NAME.json`` beside it (``apla-rt invert`` writes it). Where
none is recorded (folders and files from before it was), the latent is taken to be a DDIM
inversion with the run's ``sample.inversion_steps``.

A VGT trained with ``vgt.source`` also reads the clean latent of the clip being edited: the
training clip's (the manifest's) for its start latent and for noise, the new clip's for a
latent from ``invert`` (``Latent.clean``; on disk ``NAME.source.npy`` next to ``NAME.npy``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .sampling.deepcache import check_cache_interval, check_cache_schedule
from .errors import InputError
from .folder.jsonfile import read_json_object
from .folder.manifest import Manifest, check_latent, load_npy
from .engine import (Engine, StepCallback, Timings, check_frames, check_guidance,
                       check_manifest_start_frames, check_start_frames, check_steps,
                       start_latent)
from .sampling.solvers import (check_guidance_interval, check_solver, check_start_timestep,
                      inverted_timestep, noise_timestep)
from .media.video import video_bytes, read_video, write_video

GENERATE_NETWORKS = ("text_encoder", "unet", "vgt", "vae_decoder")
INVERT_NETWORKS = ("text_encoder", "unet", "vgt", "vae_encoder")


def source_path_for(latent_path: str | os.PathLike) -> Path:
    """Where the clean latents of an inverted clip sit next to its start latent."""
    path = Path(latent_path)
    stem = path.name[:-len(".npy")] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + ".source.npy")


def timestep_path_for(latent_path: str | os.PathLike) -> Path:
    """Where the timestep of a start latent ``NAME.npy`` is recorded: ``NAME.json`` beside it,
    ``{"timestep": t, "inversion_steps": n}``."""
    path = Path(latent_path)
    stem = path.name[:-len(".npy")] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + ".json")


@dataclass(frozen=True)
class Latent:
    """A start latent (1, c, f, h, w), the clean latents of the clip it came from and the
    timestep it belongs to (None: unknown, taken as the run's inversion's)."""

    start: np.ndarray
    clean: np.ndarray | None = None
    timestep: int | None = None


@dataclass
class Video:
    """One generated video and how it was made."""

    frames: np.ndarray  # uint8 (f, H, W, 3)
    fps: float
    prompt: str
    seed: int
    negative_prompt: str
    steps: int
    guidance: float
    vgt: bool  # whether the VGT perturbation was added
    latents: np.ndarray  # the final latents (1, c, f, h, w)
    start: np.ndarray  # the start latent
    batch_size: int  # how many videos shared the networks' calls
    scheduler: str = "ddim"  # the solver
    start_timestep: int = 0  # the timestep sampling started at
    guidance_interval: tuple[float, float] | None = None  # None: every step guided
    cache_interval: int = 1  # DeepCache (apla_rt.sampling.deepcache): 1 = off
    cache_schedule: str = "uniform"

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the video atomically (``.mp4`` or ``.gif``); never replaces without ``force``."""
        return write_video(path, self.frames, fps=self.fps, force=force)

    def encode(self, fmt: str = "mp4") -> bytes:
        """The video file's bytes ("mp4" or "gif"), made in memory."""
        return video_bytes(self.frames, fmt, fps=self.fps)


@dataclass(frozen=True)
class Request:
    """One video to generate; ``None`` takes the run's setting (or the start latent's frames)."""

    prompt: str
    seed: int = 0
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = ""
    scheduler: str | None = None
    guidance_interval: tuple[float, float] | None = None  # (lo, hi); None: every step
    cache_interval: int = 1  # the full UNet every N steps, the shallow one between (1 = off)
    cache_schedule: str = "uniform"  # or "nonuniform": full steps denser early


@dataclass
class _Item:
    request: Request
    steps: int
    guidance: float
    start: np.ndarray
    clean: np.ndarray | None  # what a vgt.source VGT reads, else None
    scheduler: str = "ddim"
    start_timestep: int = 0
    guidance_interval: tuple[float, float] | None = None


class Pipeline:
    """An opened engine folder (see the module docstring). Close it, or use ``with``."""

    def __init__(self, engine: Engine, use_vgt: bool = True, max_batch: int | None = None):
        self.engine = engine
        self.use_vgt = use_vgt
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise InputError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
        self.max_batch = max_batch or self.profile_batch()
        self._start: np.ndarray | None = None
        self._clean: np.ndarray | None = None

    @classmethod
    def open(cls, engine_dir: str | os.PathLike, backend: str = "auto", threads: int | None = None,
             *, use_vgt: bool = True, max_batch: int | None = None, for_inversion: bool = False,
             timings: Timings | None = None, precision: str = "auto") -> "Pipeline":
        """Open and verify the networks ``generate`` needs (``for_inversion``: those ``invert``
        needs, the UNet set up for batch 1); the others open on first use. ``precision``:
        "auto", "fp32" or "bf16" (``apla_rt.backends.precision``)."""
        names: tuple[str, ...] = INVERT_NETWORKS if for_inversion else GENERATE_NETWORKS
        if not use_vgt:
            names = tuple(n for n in names if n != "vgt")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise InputError(f"--threads must be at least 1, got {threads!r}")
        engine = Engine.open(engine_dir, backend, names, threads, timings,
                             guidance_batch=not for_inversion, precision=precision)
        try:
            return cls(engine, use_vgt, max_batch)
        except BaseException:
            engine.close()
            raise

    # -- the engine folder ---------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest

    @property
    def timings(self) -> Timings:
        return self.engine.timings

    @property
    def vgt(self) -> bool:
        """Whether generated videos get the VGT perturbation."""
        return self.use_vgt and self.engine.has_vgt

    @property
    def vgt_reads_source(self) -> bool:
        """The VGT reads the clean latent of the clip being edited (``vgt.source``)."""
        return self.engine.has_vgt and "source" in self.manifest.network("vgt").input_names

    def profile_batch(self) -> int:
        """Videos per call the engines take: the UNet's batch max over 2 rows per video
        (guidance), and the VGT's batch max."""
        limits = [self.manifest.network("unet").profile.get("batch", (1, 1, 2))[2] // 2]
        if self.vgt:
            limits.append(self.manifest.network("vgt").profile.get("batch", (1, 1, 1))[2])
        return max(1, min(limits))

    def _setting(self, key: str, flag: str) -> float:
        return _number_setting(self.manifest, key, flag)

    def default_steps(self) -> int:
        return check_steps(self._setting("steps", "--steps"), "the run's sample.steps")

    def default_guidance(self) -> float:
        return check_guidance(self._setting("guidance", "--guidance"))

    def default_inversion_steps(self) -> int:
        """The run's ``sample.inversion_steps``, else its sampling steps."""
        return default_inversion_steps(self.manifest)

    def default_scheduler(self) -> str:
        return run_scheduler(self.manifest)

    def fallback_timestep(self) -> int:
        return fallback_timestep(self.manifest)

    def start_timestep(self) -> int:
        return start_timestep_of(self.manifest)

    def latent_timestep(self, latent_path: str | os.PathLike) -> int:
        """The timestep recorded beside a ``.npy`` start latent (``timestep_path_for``)."""
        path = timestep_path_for(latent_path)
        if not path.is_file():
            return self.fallback_timestep()
        value = read_json_object(path).get("timestep")
        return check_start_timestep(self.manifest.scheduler, value, f"timestep in {path}")

    def describe(self) -> str:
        return self.engine.describe()

    def describe_precision(self) -> str:
        return self.engine.describe_precision()

    def summary(self) -> dict[str, Any]:
        """What the engine folder holds and how this pipeline samples it (JSON-ready)."""
        m = self.manifest
        lo, opt, hi = m.frame_range()
        shape = m.start_latent_shape()
        out: dict[str, Any] = {
            "prompt": m.prompt, "frames": {"min": lo, "opt": opt, "max": hi},
            "start_latent": list(shape) if shape is not None else None,
            "latent_size": list(m.latent_size()), "image_size": m.latent_size()[0] * m.vae_downsample,
            "fps": m.fps, "networks": {name: {d: list(r) for d, r in spec.profile.items()}
                                       for name, spec in m.networks.items()},
            "vgt": self.vgt, "vgt_reads_source": self.vgt_reads_source,
            "max_batch": self.max_batch, "backend": self.describe(),
            "precision": self.describe_precision(), "precision_notes": list(self.engine.notes),
            "checkpoint_sha256": m.checkpoint_sha256, "versions": m.versions,
        }
        out["start_timestep"] = self.start_timestep() if shape is not None else None
        for key, get in (("steps", self.default_steps), ("guidance", self.default_guidance),
                         ("scheduler", self.default_scheduler)):
            try:
                out[key] = get()
            except InputError:
                out[key] = None
        return out

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generate ------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], seeds: int | Sequence[int] | None = None, *,
                 frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                 negative_prompt: str = "", from_noise: bool = False,
                 latent: Latent | np.ndarray | str | os.PathLike | None = None,
                 callback: StepCallback | None = None, scheduler: str | None = None,
                 guidance_interval: tuple[float, float] | None = None, cache_interval: int = 1,
                 cache_schedule: str = "uniform") -> list[Video]:
        """One video per (prompt, seed) pair, in that order; see the module docstring.

        ``cache_interval`` N > 1: the full UNet at N-th steps only, its outer blocks on the
        cached feature in between (DeepCache, ``apla_rt.sampling.deepcache``; needs a folder exported
        with the cache graphs); ``cache_schedule`` "uniform" or "nonuniform"."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        seed_list = [0] if seeds is None else [seeds] if not isinstance(seeds, Sequence) else list(seeds)
        if not prompt_list or not seed_list:
            raise InputError("give at least one prompt and one seed")
        n = max(len(prompt_list), len(seed_list))
        if len(prompt_list) not in (1, n) or len(seed_list) not in (1, n):
            raise InputError(f"{len(prompt_list)} prompts and {len(seed_list)} seeds do not pair "
                             "up; give as many of each, or one of either")
        requests = [Request(prompt_list[i % len(prompt_list)], seed_list[i % len(seed_list)],
                            frames, steps, guidance, negative_prompt, scheduler=scheduler,
                            guidance_interval=guidance_interval, cache_interval=cache_interval,
                            cache_schedule=cache_schedule) for i in range(n)]
        return self.run(requests, from_noise=from_noise, latent=latent, callback=callback)

    def run(self, requests: Sequence[Request], *, from_noise: bool = False,
            latent: Latent | np.ndarray | str | os.PathLike | None = None,
            callback: StepCallback | None = None) -> list[Video]:
        """Generate ``requests`` (in order). Those with the same frame count, steps, scheduler,
        start timestep, guidance interval and cache are batched together, ``max_batch`` at a
        time; the rest of a request may differ."""
        items = [self._item(r, from_noise, latent) for r in requests]
        videos: list[Video | None] = [None] * len(items)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            key = (item.start.shape, item.steps, item.scheduler, item.start_timestep,
                   item.guidance_interval, item.request.cache_interval, item.request.cache_schedule)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            for k in range(0, len(indices), self.max_batch):
                chunk = indices[k:k + self.max_batch]
                for i, video in zip(chunk, self._generate_batch([items[i] for i in chunk], callback)):
                    videos[i] = video
        return [v for v in videos if v is not None]

    def check(self, request: Request, *, from_noise: bool = False,
              latent: Latent | np.ndarray | str | os.PathLike | None = None) -> None:
        """Raise ``InputError`` (the CLI's one-line message) for a request ``run`` refuses."""
        self._item(request, from_noise, latent)

    def _item(self, request: Request, from_noise: bool,
              latent: Latent | np.ndarray | str | os.PathLike | None) -> _Item:
        """Check a request and find its start latent (and clean latents for the VGT)."""
        r = request
        if not isinstance(r.prompt, str) or not isinstance(r.negative_prompt, str):
            raise InputError("--prompt and --negative-prompt must be text")
        if isinstance(r.seed, bool) or not isinstance(r.seed, (int, np.integer)) or not 0 <= r.seed < 2**63:
            raise InputError(f"--seed must be an integer from 0 to 2**63 - 1, got {r.seed!r}")
        self.engine.tokenizer([r.negative_prompt, r.prompt])  # an over-long prompt fails here
        steps = check_steps(r.steps) if r.steps is not None else self.default_steps()
        guidance = check_guidance(r.guidance) if r.guidance is not None else self.default_guidance()
        scheduler = check_solver(r.scheduler) if r.scheduler is not None else self.default_scheduler()
        interval = (check_guidance_interval(r.guidance_interval)
                    if r.guidance_interval is not None else None)
        cfg = self.manifest.scheduler
        check_cache_schedule(r.cache_schedule)
        if check_cache_interval(r.cache_interval) > 1:
            self.engine.check_cache()
        needs_clean = self.use_vgt and self.vgt_reads_source
        clean = None
        if latent is not None and not isinstance(latent, (str, os.PathLike)):
            if from_noise:
                raise InputError("--latent and --from-noise exclude each other; give one")
            given = latent if isinstance(latent, Latent) else Latent(latent)
            start_t = (check_start_timestep(cfg, given.timestep, "given latent's timestep")
                       if given.timestep is not None else self.fallback_timestep())
            z = check_latent(given.start, self.manifest.latent_channels, "the given latent")
            z = check_start_frames(z, r.frames, self.manifest, "the given latent")
            if needs_clean:
                if given.clean is None:
                    raise InputError("this model's VGT reads the clean latent of the clip being "
                                     "edited; pass the Latent that invert returned, or use_vgt=False")
                clean = self._check_clean(given.clean, z, "the given latent's clean latent")
        elif latent is not None:
            z = start_latent(self.manifest, r.frames, int(r.seed), from_noise, latent)
            start_t = self.latent_timestep(latent)
            if needs_clean:
                path = source_path_for(latent)
                if not path.is_file():
                    raise InputError(f"this model's VGT reads the clean latent of the clip that "
                                     f"--latent {latent} was inverted from; apla-rt invert writes "
                                     f"it next to the latent as {path} (missing); or pass --no-vgt")
                clean = self._check_clean(load_npy(path), z, str(path))
        elif from_noise or self.manifest.start_latent_path is None:
            z = start_latent(self.manifest, r.frames, int(r.seed), from_noise, None)
            start_t = noise_timestep(cfg)
        else:
            check_manifest_start_frames(self.manifest, r.frames)
            start_t = self.start_timestep()
            if self._start is None:
                self._start = self.manifest.load_start_latent()
            z = self._start
        if needs_clean and clean is None:
            if self._clean is None:
                self._clean = self.manifest.load_source_latent()
            if self._clean.shape != z.shape:
                raise InputError(f"this model's VGT reads the training clip's latent "
                                 f"{list(self._clean.shape)}; a start latent of {list(z.shape)} "
                                 f"cannot use it: keep the clip's frame count or pass --no-vgt")
            clean = self._clean
        if steps > start_t - cfg.steps_offset + 1:
            raise InputError(f"--steps {steps} is more than the {start_t - cfg.steps_offset + 1} "
                             f"timesteps from the start latent's t={start_t} down to "
                             f"t={cfg.steps_offset}; use fewer steps")
        return _Item(r, steps, guidance, z, clean, scheduler, start_t, interval)

    def _check_clean(self, clean: Any, start: np.ndarray, what: str) -> np.ndarray:
        clean = check_latent(clean, self.manifest.latent_channels, what)
        if clean.shape != start.shape:
            raise InputError(f"{what} has shape {list(clean.shape)}, the start latent "
                             f"{list(start.shape)}; invert the clip again")
        return clean

    def _generate_batch(self, items: list[_Item], callback: StepCallback | None) -> list[Video]:
        """One DDIM loop for ``items`` (same shape and steps), then each video decoded."""
        engine = self.engine
        texts = [it.request.negative_prompt for it in items] + [it.request.prompt for it in items]
        unique = list(dict.fromkeys(texts))
        encoded = engine.encode_text(unique)
        text = encoded if unique == texts else np.ascontiguousarray(encoded[[unique.index(t) for t in texts]])
        start = np.concatenate([it.start for it in items])
        clean = (np.concatenate([it.clean for it in items if it.clean is not None])
                 if items[0].clean is not None else None)
        guidance = np.array([it.guidance for it in items], dtype=np.float32)
        first = items[0]
        z = engine.sample(start, text, first.steps, guidance, self.use_vgt, callback, clean,
                          scheduler=first.scheduler, start_timestep=first.start_timestep,
                          guidance_interval=first.guidance_interval,
                          cache_interval=first.request.cache_interval,
                          cache_schedule=first.request.cache_schedule)
        videos = []
        for i, it in enumerate(items):
            r = it.request
            videos.append(Video(engine.decode(z[i:i + 1]), self.manifest.fps, r.prompt, int(r.seed),
                                r.negative_prompt, it.steps, it.guidance, self.vgt, z[i:i + 1],
                                it.start, len(items), it.scheduler, it.start_timestep,
                                it.guidance_interval, r.cache_interval, r.cache_schedule))
        return videos

    # -- invert --------------------------------------------------------------------------

    def invert(self, video: str | os.PathLike, *, steps: int | None = None,
               frames: int | None = None, start: int | None = None, stride: int | None = None,
               callback: StepCallback | None = None) -> Latent:
        """DDIM-invert a clip into a start latent for ``generate(..., latent=...)``.

        Frames ``start, start + stride, ...`` (defaults: the run config's, else 0 and 1) are
        read at the engine's size; ``frames`` defaults to the start latent's frame count,
        ``steps`` to the run's inversion steps."""
        steps = check_steps(steps) if steps is not None else self.default_inversion_steps()
        manifest = self.manifest
        with self.timings("load"):
            shape = manifest.start_latent_shape()
            if frames is None:
                frames = int(shape[2]) if shape is not None else manifest.frame_range()[1]
            frames = check_frames(frames, manifest)
            h, w = manifest.latent_size()
            if h != w:
                raise InputError(f"the engines take {h}x{w} latents; invert reads square frames only")
            start = start if start is not None else _config_value(manifest, "data", "start") or 0
            stride = stride if stride is not None else _config_value(manifest, "data", "stride") or 1
            pixels = read_video(video, start=start, stride=stride, n_frames=frames,
                                size=h * manifest.vae_downsample)
        clean = self.engine.encode_frames(pixels)
        z = self.engine.invert_latents(clean, steps, self.use_vgt, callback)
        return Latent(z, clean, inverted_timestep(manifest.scheduler, steps))


def _sample_settings(manifest: Manifest) -> list[dict[str, Any]]:
    """Where the run's sampling settings are: the manifest's ``sample_defaults``, then its
    config's ``sample`` section."""
    config = manifest.data.get("config")
    sections = (manifest.data.get("sample_defaults"),
                config.get("sample") if isinstance(config, dict) else None)
    return [s for s in sections if isinstance(s, dict)]


def _number_setting(manifest: Manifest, key: str, flag: str) -> float:
    for section in _sample_settings(manifest):
        value = section.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value) if key.endswith("steps") and float(value).is_integer() else value
    raise InputError(f"the engine folder {manifest.root} does not record the run's "
                     f"{key.replace('_', ' ')}; pass {flag}")


def default_inversion_steps(manifest: Manifest) -> int:
    """The run's ``sample.inversion_steps``, else its sampling steps."""
    try:
        steps = _number_setting(manifest, "inversion_steps", "--steps")
    except InputError:
        steps = _number_setting(manifest, "steps", "--steps")
    return check_steps(steps, "the run's sample.inversion_steps")


def run_scheduler(manifest: Manifest) -> str:
    """The run's ``sample.scheduler``; "ddim" for folders that record none."""
    for section in _sample_settings(manifest):
        if section.get("scheduler") is not None:
            return check_solver(section["scheduler"], "the run's sample.scheduler")
    return "ddim"


def fallback_timestep(manifest: Manifest) -> int:
    """The timestep of a start latent that records none: a DDIM inversion with the run's
    inversion steps (how such latents were made), else seeded noise's."""
    try:
        return inverted_timestep(manifest.scheduler, default_inversion_steps(manifest))
    except InputError:
        return noise_timestep(manifest.scheduler)


def start_timestep_of(manifest: Manifest) -> int:
    """The timestep of the engine folder's start latent: the manifest's ``start_timestep``,
    else ``fallback_timestep``."""
    if manifest.start_timestep is not None:
        return manifest.start_timestep
    return fallback_timestep(manifest)


def _config_value(manifest: Manifest, section: str, key: str) -> Any:
    config = manifest.data.get("config")
    part = config.get(section) if isinstance(config, dict) else None
    return part.get(key) if isinstance(part, dict) else None
