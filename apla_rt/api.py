"""The Python API (torch-free): open an engine folder once, generate videos in batches,
invert new clips for editing. The CLI, ``apla-rt serve`` and ``apla-rt batch`` go through it.

    from apla_rt import Pipeline, SamplingSettings
    pipe = Pipeline.open("engines/ski", backend="auto", threads=None)   # verifies once
    videos = pipe.generate(["a man is skiing", "a panda is skiing"], seeds=[1, 2])
    videos[0].frames          # uint8 (f, H, W, 3)
    videos[0].save("a.mp4")   # or .gif; videos[0].encode("mp4") gives the bytes
    fast = pipe.generate("a man is skiing", settings=SamplingSettings(solver="unipc", steps=20))
    latent = pipe.invert("new-clip.mp4")
    edited = pipe.generate("a panda is skiing", latent=latent)

``generate`` pairs prompts with seeds (a single prompt or seed is used for every video) and
runs the videos through the networks together, ``max_batch`` videos per call (default: what
the UNet's profile takes: half its batch range, two rows per video for guidance). Seeds
matter when starting from noise (``from_noise``); otherwise every video starts from the
engine folder's inverted training clip, or from ``latent`` (``apla_rt.folder.latents``).

How each video is sampled is its ``SamplingSettings`` (``apla_rt.sampling.settings``):
``settings=`` or the same fields as keywords (``steps=``, ``guidance=``, ``scheduler=`` for
the solver, ``guidance_interval=``, ``cache_interval=``, ``cache_schedule=``); what neither
gives is the run's (``Manifest.sampling_defaults``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .backends.placement import Placement, check_threads
from .engine import GENERATE_NETWORKS, INVERT_NETWORKS, Engine
from .errors import InputError
from .folder.latents import GivenLatent, Latent, StartLatents, check_frames, folder_start_timestep
from .folder.manifest import Manifest
from .media.video import read_video, video_bytes, write_video
from .sampling.loop import StepCallback
from .sampling.settings import SamplingSettings, check_steps
from .sampling.solvers import check_steps_fit, inverted_timestep
from .sampling.timings import Timings

__all__ = ["Latent", "Pipeline", "Request", "SamplingSettings", "Video"]


@dataclass(frozen=True, init=False)
class Request:
    """One video to generate; settings left None take the run's (frames: the start latent's).

    ``Request(prompt, seed, frames, negative_prompt, settings)``, where the sampling settings
    may also be given as keywords: ``Request("a panda", 3, steps=20, scheduler="unipc")``."""

    prompt: str
    seed: int
    frames: int | None
    negative_prompt: str
    settings: SamplingSettings

    def __init__(self, prompt: str, seed: int = 0, frames: int | None = None,
                 negative_prompt: str = "", settings: SamplingSettings | None = None,
                 **sampling: Any):
        merged = (settings or SamplingSettings()).replace(**sampling)
        for name, value in (("prompt", prompt), ("seed", seed), ("frames", frames),
                            ("negative_prompt", negative_prompt), ("settings", merged)):
            object.__setattr__(self, name, value)


@dataclass
class Video:
    """One generated video and how it was made (``settings``: complete)."""

    frames: np.ndarray  # uint8 (f, H, W, 3)
    fps: float
    prompt: str
    seed: int
    negative_prompt: str
    settings: SamplingSettings
    vgt: bool  # whether the VGT perturbation was added
    latents: np.ndarray  # the final latents (1, c, f, h, w)
    start: np.ndarray  # the start latent
    start_timestep: int  # the timestep sampling started at
    batch_size: int  # how many videos shared the networks' calls

    def save(self, path: str | os.PathLike, force: bool = False) -> os.PathLike:
        """Write the video atomically (``.mp4`` or ``.gif``); never replaces without ``force``."""
        return write_video(path, self.frames, fps=self.fps, force=force)

    def encode(self, fmt: str = "mp4") -> bytes:
        """The video file's bytes ("mp4" or "gif"), made in memory."""
        return video_bytes(self.frames, fmt, fps=self.fps)

    def record(self) -> dict[str, Any]:
        """How the video was made, as JSON (``index.json`` entries)."""
        return {"prompt": self.prompt, "seed": self.seed, "negative_prompt": self.negative_prompt,
                "frames": int(self.frames.shape[0]), **self.settings.to_dict(),
                "start_timestep": self.start_timestep, "vgt": self.vgt}


@dataclass
class _Item:
    """A checked request: its complete settings and where it starts."""

    request: Request
    settings: SamplingSettings
    start: Latent

    def group(self) -> tuple[Any, ...]:
        """What videos sampled together must share: everything but the guidance scale."""
        return (self.start.start.shape, self.start.timestep,
                dataclasses.replace(self.settings, guidance=None))


@dataclass(frozen=True)
class Opening:
    """How ``Pipeline.open`` opens an engine folder, besides its backend and threads."""

    use_vgt: bool = True  # add the VGT's perturbation (False: Tune-A-Video)
    max_batch: int | None = None  # videos per loop (None: what the engines' profiles take)
    for_inversion: bool = False  # open what ``invert`` needs, the UNet for batch 1
    precision: str = "auto"  # apla_rt.backends.placement
    cache: bool | None = None  # the DeepCache graphs too (None: where the defaults use them)
    # DDIM at the run's steps in fp32, as exported: no tuned setting, ONNX Runtime fp32
    exact: bool = False


class Pipeline:
    """An opened engine folder (see the module docstring). Close it, or use ``with``."""

    def __init__(self, engine: Engine, use_vgt: bool = True, max_batch: int | None = None,
                 tuned: dict[str, Any] | None = None):
        self.engine = engine
        self.use_vgt = use_vgt
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise InputError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
        self.max_batch = max_batch or self.profile_batch()
        self.tuned = tuned  # this machine's entry of the folder's tuned.json, where it applies
        run = self.manifest.sampling_defaults()
        self.defaults = run if tuned is None else SamplingSettings.from_dict(tuned["settings"]).over(run)
        self.starts = StartLatents(self.manifest, use_vgt and engine.vgt_reads_source)

    @classmethod
    def open(cls, engine_dir: str | os.PathLike, backend: str = "auto", threads: int | None = None,
             **options: Any) -> "Pipeline":
        """Open, verify and warm up the networks ``generate`` needs. ``backend``, ``precision``
        and ``threads``: see ``apla_rt.backends.placement``; the other ``options`` are
        ``Opening``'s. Where ``apla-rt tune`` chose a setting for this folder on this machine
        (``tuned.json``) it is the default, unless ``exact``."""
        o = Opening(**options)
        check_threads(threads)
        if o.exact and o.precision not in ("auto", "fp32"):
            raise InputError(f"--exact runs fp32; drop --precision {o.precision}")
        names: tuple[str, ...] = INVERT_NETWORKS if o.for_inversion else GENERATE_NETWORKS
        if not o.use_vgt:
            names = tuple(n for n in names if n != "vgt")
        precision = "fp32" if o.exact else o.precision
        manifest = Manifest.open(engine_dir)
        tuned = None if o.exact or o.for_inversion else tuned_for(manifest, backend, precision, threads)
        engine = Engine.open(manifest, "ort-cpu" if o.exact and backend == "auto" else backend,
                             names, threads, None, guidance_batch=not o.for_inversion,
                             precision=_placed_precision(tuned, backend, precision))
        try:
            pipe = cls(engine, o.use_vgt, o.max_batch, tuned)
            if not o.for_inversion:
                pipe.warm_up(o.cache)
            return pipe
        except BaseException:
            engine.close()
            raise

    def warm_up(self, cache: bool | None = None) -> None:
        """Open the DeepCache graphs where ``cache`` says (see ``open``) and run every network
        once at the shapes of one video with the run's settings from the folder's start."""
        try:
            settings = self.defaults.filled(self.defaults)
        except InputError:  # the folder records no settings: each request brings its own
            return
        assert settings.cache_interval is not None
        if cache is None:
            cache = settings.cache_interval > 1
        settings = settings.replace(cache_interval=max(2, settings.cache_interval) if cache else 1)
        start = self.starts.resolve(None, 0, self.manifest.start_latent_path is None, None)
        text = self.engine.warm_up_text(["", self.manifest.prompt or ""])
        self.engine.prepare(start.start, self.engine.plan(start, text, settings, use_vgt=self.use_vgt))
        self.engine.warm_up_decoder(start.start.shape[2])

    # -- the engine folder ---------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest

    @property
    def timings(self) -> Timings:
        return self.engine.timings

    @property
    def placement(self) -> Placement:
        return self.engine.placement

    @property
    def vgt(self) -> bool:
        """Whether generated videos get the VGT perturbation."""
        return self.use_vgt and self.engine.has_vgt

    @property
    def vgt_reads_source(self) -> bool:
        """The VGT reads the clean latent of the clip being edited (``vgt.source``)."""
        return self.engine.vgt_reads_source

    def profile_batch(self) -> int:
        """Videos per call the engines take: the UNet's batch max over 2 rows per video
        (guidance), and the VGT's batch max."""
        limits = [self.manifest.network("unet").profile.get("batch", (1, 1, 2))[2] // 2]
        if self.vgt:
            limits.append(self.manifest.network("vgt").profile.get("batch", (1, 1, 1))[2])
        return max(1, min(limits))

    def settings_for(self, settings: SamplingSettings | None = None) -> SamplingSettings:
        """``settings`` (checked) completed with the run's."""
        return (settings or SamplingSettings()).check().filled(self.defaults)

    def inversion_steps(self) -> int:
        """The run's ``sample.inversion_steps``, else its sampling steps."""
        steps = self.manifest.inversion_steps()
        if steps is None:
            raise InputError(f"the engine folder {self.manifest.root} does not record the run's "
                             "inversion steps; pass --steps")
        return steps

    def describe(self) -> str:
        """The runners that run (``Placement.describe``) and why."""
        return self.placement.describe(self.engine.runners)

    def describe_precision(self) -> str:
        return self.placement.describe_precision(self.engine.runners)

    def summary(self) -> dict[str, Any]:
        """What the engine folder holds and how this pipeline samples it (JSON-ready)."""
        m = self.manifest
        lo, opt, hi = m.frame_range()
        shape = m.start_latent_shape()
        out: dict[str, Any] = {
            "prompt": m.prompt, "frames": {"min": lo, "opt": opt, "max": hi},
            "start_latent": list(shape) if shape is not None else None,
            "start_timestep": folder_start_timestep(m) if shape is not None else None,
            "latent_size": list(m.latent_size()), "image_size": m.latent_size()[0] * m.vae_downsample,
            "fps": m.fps, "networks": {name: {d: list(r) for d, r in spec.profile.items()}
                                       for name, spec in m.networks.items()},
            "vgt": self.vgt, "vgt_reads_source": self.vgt_reads_source, "max_batch": self.max_batch,
            "backend": self.describe(), "precision": self.describe_precision(),
            "precision_notes": list(self.placement.notes), "placement": self.placement.to_dict(self.engine.runners),
            "checkpoint_sha256": m.checkpoint_sha256, "versions": m.versions,
        }
        tuned = None if self.tuned is None else {"mode": self.tuned["mode"],
                                                  "settings": self.defaults.to_dict(),
                                                  "budget_db": self.tuned.get("budget_db")}
        return {**out, **self.defaults.to_dict(), "tuned": tuned}

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generate ------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], seeds: int | Sequence[int] | None = None, *,
                 latent: GivenLatent = None, from_noise: bool = False,
                 callback: StepCallback | None = None, settings: SamplingSettings | None = None,
                 **fields: Any) -> list[Video]:
        """One video per (prompt, seed) pair, in that order; see the module docstring.

        ``fields``: the other ``Request`` fields (``frames``, ``negative_prompt``) and sampling
        settings as keywords (``steps``, ``guidance``, ``scheduler``, ``guidance_interval``,
        ``cache_interval``, ``cache_schedule``), which override ``settings``."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        seed_list = [0] if seeds is None else [seeds] if not isinstance(seeds, Sequence) else list(seeds)
        if not prompt_list or not seed_list:
            raise InputError("give at least one prompt and one seed")
        n = max(len(prompt_list), len(seed_list))
        if len(prompt_list) not in (1, n) or len(seed_list) not in (1, n):
            raise InputError(f"{len(prompt_list)} prompts and {len(seed_list)} seeds do not pair "
                             "up; give as many of each, or one of either")
        requests = [Request(prompt_list[i % len(prompt_list)], seed_list[i % len(seed_list)],
                            settings=settings, **fields) for i in range(n)]
        return self.run(requests, from_noise=from_noise, latent=latent, callback=callback)

    def run(self, requests: Sequence[Request], *, from_noise: bool = False,
            latent: GivenLatent = None, callback: StepCallback | None = None) -> list[Video]:
        """Generate ``requests`` (in order). Those with the same start shape and timestep and the
        same settings but the guidance scale are batched together, ``max_batch`` at a time."""
        items = [self._item(r, from_noise, latent) for r in requests]
        videos: list[Video | None] = [None] * len(items)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group(), []).append(i)
        for indices in groups.values():
            for k in range(0, len(indices), self.max_batch):
                chunk = indices[k:k + self.max_batch]
                for i, video in zip(chunk, self._generate_batch([items[i] for i in chunk], callback)):
                    videos[i] = video
        return [v for v in videos if v is not None]

    def check(self, request: Request, *, from_noise: bool = False, latent: GivenLatent = None) -> None:
        """Raise ``InputError`` (the CLI's one-line message) for a request ``run`` refuses."""
        self._item(request, from_noise, latent)

    def _item(self, request: Request, from_noise: bool, latent: GivenLatent) -> _Item:
        """Check a request, complete its settings and find where it starts."""
        r = request
        if not isinstance(r.prompt, str) or not isinstance(r.negative_prompt, str):
            raise InputError("--prompt and --negative-prompt must be text")
        if isinstance(r.seed, bool) or not isinstance(r.seed, (int, np.integer)) or not 0 <= r.seed < 2**63:
            raise InputError(f"--seed must be an integer from 0 to 2**63 - 1, got {r.seed!r}")
        self.engine.tokenizer([r.negative_prompt, r.prompt])  # an over-long prompt fails here
        settings = self.settings_for(r.settings)
        if (settings.cache_interval or 1) > 1:
            self.engine.check_cache()
        start = self.starts.resolve(r.frames, int(r.seed), from_noise, latent)
        assert start.timestep is not None and settings.steps is not None
        check_steps_fit(self.manifest.scheduler, settings.steps, start.timestep)
        return _Item(r, settings, start)

    def _generate_batch(self, items: list[_Item], callback: StepCallback | None) -> list[Video]:
        """One sampling loop for ``items`` (one group), then each video decoded."""
        engine = self.engine
        texts = [it.request.negative_prompt for it in items] + [it.request.prompt for it in items]
        unique = list(dict.fromkeys(texts))
        encoded = engine.encode_text(unique)
        text = encoded if unique == texts else np.ascontiguousarray(encoded[[unique.index(t) for t in texts]])
        clean = [it.start.clean for it in items if it.start.clean is not None]
        start = Latent(np.concatenate([it.start.start for it in items]),
                       np.concatenate(clean) if clean else None, items[0].start.timestep)
        guidance = np.array([it.settings.guidance for it in items], dtype=np.float32)
        z = engine.sample(start, text, items[0].settings, guidance, self.use_vgt, callback)
        videos = []
        for i, it in enumerate(items):
            r = it.request
            assert it.start.timestep is not None
            videos.append(Video(engine.decode(z[i:i + 1]), self.manifest.fps, r.prompt, int(r.seed),
                                r.negative_prompt, it.settings, self.vgt, z[i:i + 1], it.start.start,
                                it.start.timestep, len(items)))
        return videos

    # -- invert --------------------------------------------------------------------------

    def invert(self, video: str | os.PathLike, *, steps: int | None = None,
               frames: int | None = None, start: int | None = None, stride: int | None = None,
               callback: StepCallback | None = None) -> Latent:
        """DDIM-invert a clip into a start latent for ``generate(..., latent=...)``.

        Frames ``start, start + stride, ...`` (defaults: the run config's, else 0 and 1) are
        read at the engine's size; ``frames`` defaults to the start latent's frame count,
        ``steps`` to the run's inversion steps."""
        steps = check_steps(steps) if steps is not None else self.inversion_steps()
        manifest = self.manifest
        with self.timings("load"):
            shape = manifest.start_latent_shape()
            if frames is None:
                frames = int(shape[2]) if shape is not None else manifest.frame_range()[1]
            frames = check_frames(frames, manifest)
            h, w = manifest.latent_size()
            if h != w:
                raise InputError(f"the engines take {h}x{w} latents; invert reads square frames only")
            start = start if start is not None else manifest.run_setting("data", "start") or 0
            stride = stride if stride is not None else manifest.run_setting("data", "stride") or 1
            pixels = read_video(video, start=start, stride=stride, n_frames=frames,
                                size=h * manifest.vae_downsample)
        clean = self.engine.encode_frames(pixels)
        z = self.engine.invert_latents(clean, steps, self.use_vgt, callback)
        return Latent(z, clean, inverted_timestep(manifest.scheduler, steps))


def tuned_for(manifest: Manifest, backend: str, precision: str, threads: int | None) -> dict[str, Any] | None:
    """The tuned setting for these options on this machine (``tuned.json``): the one tuned
    with every precision that passed for ``auto``, the fp32-only one for ``fp32``."""
    from .backends.choice import machine_key
    from .folder.tuned import tuned_entry

    if backend != "auto" or precision not in ("auto", "fp32"):
        return None
    entry = tuned_entry(manifest.root, machine_key(manifest, threads))
    if entry is None:
        return None
    chosen = entry.get("modes", {}).get(precision)
    if not isinstance(chosen, dict) or not isinstance(chosen.get("settings"), dict):
        return None
    return {**chosen, "mode": precision, "budget_db": entry.get("budget_db")}


def _placed_precision(tuned: dict[str, Any] | None, backend: str, precision: str) -> str:
    """The precision the networks are placed in: ``precision``, but "fp32" for ``--backend auto
    --precision auto`` where the tune found that no setting in the measured placement stays
    within its budget (``tuned``, its entry, then holds the fp32 search's setting, run in fp32)."""
    if (backend, precision) == ("auto", "auto") and tuned is not None and tuned.get("precision") == "fp32":
        return "fp32"
    return precision


def tuned_line(pipe: Pipeline) -> str | None:
    """The line that says a tuned setting is ``pipe``'s default, or None."""
    if pipe.tuned is None:
        return None
    d = pipe.defaults
    cache = f", cache interval {d.cache_interval}" if (d.cache_interval or 1) > 1 else ""
    return (f"the setting apla-rt tune chose for this model on this machine: {d.solver} "
            f"{d.steps} steps{cache} ({pipe.tuned['mode']}, within {pipe.tuned.get('budget_db')} dB "
            "of DDIM 50 fp32" + (f"; in fp32: {pipe.tuned['why']}" if pipe.tuned.get("why") else "")
            + "); --exact runs DDIM at the run's steps in fp32")
