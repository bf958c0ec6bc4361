"""An opened engine folder and the steps of a run around the sampling loop.

    engine = Engine.open("engines/ski")                      placement decided, networks open
    text   = engine.encode_text([negative prompts] + [prompts])   batch 2n = [uncond; cond]
    z      = engine.sample(start, text, settings)              apla_rt.sampling.loop.walk
    frames = engine.decode(z[i:i + 1])                         VAE decoder, in chunks of frames

``sample`` makes the run's solver (``apla_rt.sampling.solvers``) and DeepCache plan, makes
sure every network the settings need is open and warmed up at the run's shapes, hands the
text to the UNet graphs once, and then walks the loop, which only calls networks and the
solver. ``invert_latents`` walks the same loop backwards: DDIM inversion, the empty prompt, no
guidance (UNet batch 1), as ``apla_train.sampling`` (the PyTorch reference sampler) does.

Every row of a batch is computed as it would be alone, so a batch gives each video's
one-at-a-time result (within float32 rounding of the networks' kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.placement import Placement, place, serving_graph
from .backends.pool import RunnerPool
from .backends.runners import Runner
from .errors import BackendUnavailable, InputError
from .folder.latents import Latent
from .folder.manifest import Manifest
from .media.tokenizer import ClipTokenizer
from .media.video import frames_to_images, images_to_frames
from .sampling.deepcache import NETWORKS as CACHE_NETWORKS, FeatureCache
from .sampling.loop import Conditioning, StepCallback, walk
from .sampling.settings import SamplingSettings
from .sampling.solvers import (DDIMInversion, check_start_timestep, check_steps_fit, guided_steps,
                               make_solver, noise_timestep)
from .sampling.timings import Timings

DECODE_CHUNK = 8  # frames per VAE call (also capped by the VAE's profile)
GENERATE_NETWORKS = ("text_encoder", "unet", "vgt", "vae_decoder")
INVERT_NETWORKS = ("text_encoder", "unet", "vgt", "vae_encoder")


def graphs_for(manifest: Manifest, networks: tuple[str, ...]) -> tuple[str, ...]:
    """The graphs that run ``networks`` in this folder (``serving_graph``), the optional ones
    (the VGT, the cache graphs) where the folder has them."""
    return tuple(dict.fromkeys(serving_graph(manifest, n) for n in networks
                               if manifest.has(n) or n not in ("vgt", *CACHE_NETWORKS)))


class Engine:
    """An engine folder opened for sampling: its manifest, where its networks run
    (``placement``), their runners (``pool``), the tokenizer and the run's ``timings``."""

    def __init__(self, manifest: Manifest, placement: Placement, timings: Timings | None = None):
        self.manifest = manifest
        self.placement = placement
        self.timings = timings or Timings()
        self.pool = RunnerPool(manifest, placement, self.timings)
        self._tokenizer: ClipTokenizer | None = None

    @classmethod
    def open(cls, engine_dir: str | os.PathLike | Manifest, backend: str = "auto",
             networks: tuple[str, ...] = GENERATE_NETWORKS, threads: int | None = None,
             timings: Timings | None = None, guidance_batch: bool = True,
             precision: str = "auto") -> "Engine":
        """Place and open ``networks`` (those of them the folder has; the VGT and the cache
        graphs are optional); ``guidance_batch=False`` where the UNet only ever runs on batch 1
        (inversion)."""
        timings = timings or Timings()
        with timings("load"):
            manifest = engine_dir if isinstance(engine_dir, Manifest) else Manifest.open(engine_dir)
            present = graphs_for(manifest, networks)
            placement = place(manifest, present, backend, precision, threads,
                              guidance_batch=guidance_batch)
        engine = cls(manifest, placement, timings)
        try:
            engine.pool.open(present)
        except BaseException:
            engine.close()
            raise
        return engine

    @property
    def runners(self) -> dict[str, Runner]:
        return self.pool.runners

    @property
    def has_vgt(self) -> bool:
        return self.manifest.has("vgt")

    @property
    def vgt_reads_source(self) -> bool:
        """The VGT was trained with ``vgt.source``: it also reads the clean source latent."""
        return self.has_vgt and "source" in self.manifest.network("vgt").input_names

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            self.manifest.verify([self.manifest.tokenizer_dir])
            self._tokenizer = ClipTokenizer.load(self.manifest.tokenizer_dir,
                                                 self.manifest.model_max_length)
        return self._tokenizer

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_cache(self) -> None:
        """The folder has the DeepCache graphs and they can run on this backend; else one line."""
        missing = [n for n in CACHE_NETWORKS if not self.manifest.has(n)]
        if missing:
            raise InputError(f"--cache-interval above 1 needs the DeepCache graphs {', '.join(CACHE_NETWORKS)}, "
                             f"which the engine folder {self.manifest.root} does not have (exported "
                             "before them, or with --no-cache-graphs); re-export the run, or use "
                             "--cache-interval 1")
        if self.placement.backend == "trt" and any(self.manifest.network(n).engine is None
                                                   for n in CACHE_NETWORKS):
            raise BackendUnavailable("--cache-interval above 1: the engine folder has no TensorRT engine "
                                     f"for {', '.join(CACHE_NETWORKS)}; re-export with TensorRT, or use "
                                     "--backend ort-cuda / ort-cpu")

    # -- the steps of a run --------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> text embeddings (n, seq, hidden) float32."""
        ids = self.tokenizer(prompts)
        self.pool.open(("text_encoder",))
        with self.timings("text encoder"):
            return self.pool.run("text_encoder", {"input_ids": ids}).astype(np.float32, copy=False)

    def plan(self, start: Latent, text: np.ndarray, settings: SamplingSettings,
             guidance: np.ndarray | None = None, use_vgt: bool = True) -> "Run":
        """What ``sample`` will run: the solver, the conditioning and the DeepCache plan."""
        cfg = self.manifest.scheduler
        t0 = noise_timestep(cfg) if start.timestep is None else check_start_timestep(cfg, start.timestep)
        assert settings.steps is not None and settings.solver is not None and settings.guidance is not None
        assert settings.cache_interval is not None and settings.cache_schedule is not None
        check_steps_fit(cfg, settings.steps, t0)
        solver = make_solver(settings.solver, cfg, settings.steps, t0)
        cache = None
        if settings.cache_interval > 1:
            self.check_cache()
            cache = FeatureCache.plan(solver.steps, settings.cache_interval, settings.cache_schedule)
        n = start.start.shape[0]
        scale = (np.full((n,), settings.guidance, np.float32) if guidance is None
                 else np.asarray(guidance, np.float32))
        cond = Conditioning(text, scale, guided_steps(solver.steps, settings.guidance_interval),
                            use_vgt and self.has_vgt, self._source(start, use_vgt))
        return Run(solver, cond, cache)

    def warm_up_text(self, prompts: list[str]) -> np.ndarray:
        """``encode_text`` as the warm-up's call (timed as warm-up, not as the text encoder)."""
        ids = self.tokenizer(prompts)
        self.pool.open(("text_encoder",))
        out = self.pool.warm_up("text_encoder", {"input_ids": ids})
        return self.encode_text(prompts) if out is None else out["last_hidden_state"].astype(np.float32)

    def sample(self, start: Latent, text: np.ndarray, settings: SamplingSettings,
               guidance: np.ndarray | None = None, use_vgt: bool = True,
               callback: StepCallback | None = None) -> np.ndarray:
        """Sample from ``start`` (its latents (n, c, f, h, w), their timestep, the clean
        latents a ``vgt.source`` VGT reads) with complete ``settings`` (``SamplingSettings.filled``);
        ``text`` (2n, ...) = [uncond; cond]; ``guidance``: one scale per video (default the
        settings')."""
        run = self.plan(start, text, settings, guidance, use_vgt)
        self.prepare(start.start, run)
        with self.pool.pinned(text, run.graphs):
            return walk(self.pool, start.start, run.solver, run.cond, run.cache, callback)

    def invert_latents(self, latents: np.ndarray, steps: int, use_vgt: bool = True,
                       callback: StepCallback | None = None) -> np.ndarray:
        """DDIM inversion of clean latents: empty prompt, no guidance, ascending timesteps.

        A VGT trained with ``vgt.source`` gets ``latents`` as its source, as in training."""
        clean = np.ascontiguousarray(latents, dtype=np.float32)
        cond = Conditioning(self.encode_text([""]), None, None, use_vgt and self.has_vgt,
                            self._source(Latent(clean, clean), use_vgt))
        run = Run(DDIMInversion(self.manifest.scheduler, steps), cond, None)
        self.prepare(clean, run)
        return walk(self.pool, clean, run.solver, cond, None, callback)

    def _source(self, start: Latent, use_vgt: bool) -> np.ndarray | None:
        """The clean latents the VGT reads, or None where it reads none."""
        if not (use_vgt and self.vgt_reads_source):
            return None
        if start.clean is None:
            raise InputError("this model's VGT reads the clean source latent (vgt.source), which "
                             "this call was not given; pass it, or --no-vgt to generate")
        return np.ascontiguousarray(start.clean, dtype=np.float32)

    def prepare(self, z: np.ndarray, run: "Run") -> None:
        """Open the UNet graphs ``run`` calls and warm up every network the loop will call at
        the shapes it will call them with (each shape once per engine), so that nothing opens
        or runs for the first time inside the loop."""
        cond, graphs = run.cond, run.graphs
        self.pool.open(graphs + (("vgt",) if cond.vgt else ()))
        n = z.shape[0]
        rows = [n] if cond.scale is None else [2 * n]
        if cond.scale is not None and cond.guided is not None and not cond.guided.all():
            rows.append(n)
        for r in rows:
            feeds = {"sample": np.concatenate([z] * (r // n)), "timestep": np.zeros((r,), np.int64),
                     "encoder_hidden_states": np.ascontiguousarray(cond.text[-r:])}
            halves = cond.scale is not None and r == 2 * n
            out = self.pool.warm_up(graphs[0], feeds, halves)
            if len(graphs) > 1 and out is not None:  # DeepCache: the shallow graph on the feature
                self.pool.warm_up(graphs[1], {**feeds, "feature": out["feature"]}, halves)
        if cond.vgt:
            vgt_feeds = {"sample": z, "timestep": np.zeros((n,), np.int64)}
            if cond.source is not None:
                vgt_feeds["source"] = cond.source
            self.pool.warm_up("vgt", vgt_feeds)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents (1, c, f, h, w) -> uint8 frames (f, H, W, 3), in chunks of frames."""
        z = np.ascontiguousarray(latents[0].transpose(1, 0, 2, 3), dtype=np.float32)
        self.pool.open(("vae_decoder",))
        with self.timings("vae"):
            x = self.pool.run("vae_decoder", {"latent": z}, preferred=DECODE_CHUNK)
        return images_to_frames(x)

    def warm_up_decoder(self, frames: int) -> None:
        """One VAE decoder call at the first chunk of a video of ``frames`` frames."""
        if self.pool.has("vae_decoder"):
            c, (h, w) = self.manifest.latent_channels, self.manifest.latent_size()
            f = min(frames, DECODE_CHUNK)
            self.pool.warm_up("vae_decoder", {"latent": np.zeros((f, c, h, w), np.float32)})

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames (f, H, W, 3) -> scaled latents (1, c, f, h, w)."""
        self.pool.open(("vae_encoder",))
        with self.timings("vae"):
            z = self.pool.run("vae_encoder", {"image": frames_to_images(frames)}, preferred=DECODE_CHUNK)
        return np.ascontiguousarray(z.transpose(1, 0, 2, 3)[None], dtype=np.float32)


@dataclass(frozen=True)
class Run:
    """One sampling run, planned: its solver, what it conditions on, its DeepCache plan."""

    solver: Any
    cond: Conditioning
    cache: FeatureCache | None

    @property
    def graphs(self) -> tuple[str, ...]:
        """The UNet graphs the loop calls."""
        return CACHE_NETWORKS if self.cache is not None else ("unet",)
