"""The runtime's sampling loop (spec section 5), NumPy around the networks' runners.

For a batch of n videos (n = 1 for one video):

    text   = TextEncoder(tokenize([negative prompts] + [prompts]))  once, batch 2n = [uncond, cond]
    z      = start latents (n, c, f, h, w): the manifest's inversion, a .npy, or seeded noise
    solver = make_solver(scheduler, cfg, steps, start timestep)   apla_rt.sampling.solvers: ddim, dpmpp-2m, unipc
    for i, t in enumerate(solver.timesteps):                       descending
        if step i is guided (lo <= i / steps < hi, the guidance interval; default every step):
            eps_u, eps_c = UNet([z, z], t, text)                  batch 2n, in chunks of the
                                                                   profile's batch (the two halves
                                                                   side by side with --threads >= 2
                                                                   on a CPU: Engine.split_guidance)
            eps_theta    = eps_u + s (eps_c - eps_u)               s per video
        else:
            eps_theta    = UNet(z, t, text[n:])                   the cond rows only: batch n
        delta        = VGT(z, t)                                   batch n (0 with --no-vgt)
        z            = solver.step(eps_theta + delta, t, z)        float64 NumPy
    frames = VAE decoder(z[i]) in chunks of frames -> uint8 -> mp4/gif

Every row of a batch is computed as it would be alone, so a batch gives each video's
one-at-a-time result (within float32 rounding of the networks' kernels).

Inversion (``invert``) is DDIM's whatever the sampling solver: the config's DDIM timesteps in
ascending order (``solvers.DDIMInversion``), the same predictor, the empty prompt and no
guidance (UNet batch 1), from the VAE encoder's latents of a video. Its latent belongs to
the last of those timesteps (``solvers.inverted_timestep``); sampling starts there.
This is the same computation as ``apla_train.sampling`` (the PyTorch reference sampler).

``generate`` and ``invert`` are the CLI's one-call entry points over ``apla_rt.api.Pipeline``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .backends import precision as cpu_precision
from .backends.precision import check_precision
from .sampling.deepcache import FULL_NETWORK, NETWORKS as CACHE_NETWORKS, SHALLOW_NETWORK, FeatureCache
from .errors import BackendUnavailable, InputError
from .folder.manifest import Manifest, check_latent, load_npy
from .backends.runners import Runner, auto_cpu_backend, open_runner, ort_cuda_available, select_backend
from .sampling.solvers import (DDIMInversion, check_guidance_interval, check_solver, check_start_timestep,
                      guided_steps, make_solver, noise_timestep)
from .media.tokenizer import ClipTokenizer

MAX_STEPS = 1000
DECODE_CHUNK = 8  # frames per VAE call (also capped by the VAE's profile)
STAGES = ("load", "text encoder", "unet", "vgt", "ddim", "vae", "video write")

StepCallback = Callable[[int, int], None]  # (step index, timestep)


# --------------------------------------------------------------------------- timings


class Timings:
    """Wall-clock seconds and call counts per stage (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(STAGES, 0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.calls[stage] = self.calls.get(stage, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 6) for k, v in self.seconds.items()}, "total": round(self.total, 6)}

    def table(self) -> str:
        total = self.total or 1e-12
        lines = [f"{'stage':<13} {'seconds':>9} {'calls':>6} {'share':>7}"]
        for stage, sec in self.seconds.items():
            lines.append(f"{stage:<13} {sec:>9.3f} {self.calls[stage]:>6} {100 * sec / total:>6.1f}%")
        lines.append(f"{'total':<13} {self.total:>9.3f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks


def check_steps(steps: Any, flag: str = "--steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"{flag} must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return int(steps)


def check_guidance(guidance: Any) -> float:
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating))
            or not math.isfinite(guidance)):
        raise InputError(f"--guidance must be a finite number, got {guidance!r}")
    return float(guidance)


def check_frames(frames: Any, manifest: Manifest, flag: str = "--frames") -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise InputError(f"{flag} must be an integer >= 1, got {frames!r}")
    lo, _opt, hi = manifest.frame_range()
    if not lo <= frames <= hi:
        raise InputError(f"{flag} {frames} is outside the engines' range {lo}..{hi} (frames)")
    return int(frames)


def _dim0_limit(spec_profile: Mapping[str, tuple[int, int, int]], dims: list[Any]) -> int | None:
    limits = [spec_profile[d][2] for d in dims if isinstance(d, str)]
    return min(limits) if limits else None


# --------------------------------------------------------------------------- the engine


@dataclass(eq=False)
class Engine:
    """An opened engine folder: manifest, runners (opened on first use), tokenizer."""

    manifest: Manifest
    backend: str  # "ort", "ort-cuda", "trt" or "openvino"
    backend_reason: str
    threads: int | None = None
    timings: Timings = field(default_factory=Timings)
    runners: dict[str, Runner] = field(default_factory=dict)
    _tokenizer: ClipTokenizer | None = None
    _pinned_text: np.ndarray | None = None
    guidance_batch: bool = True  # the UNet will run on guidance batches of 2 (generate)
    _halves: ThreadPoolExecutor | None = None  # see ``split_guidance``
    precision: str = "fp32"  # requested: "auto", "fp32" or "bf16" (apla_rt.backends.precision)
    notes: list[str] = field(default_factory=list)  # one line each: a bf16 check that missed

    @classmethod
    def open(cls, engine_dir: str | os.PathLike | Manifest, backend: str = "auto",
             networks: tuple[str, ...] = ("text_encoder", "unet", "vgt", "vae_decoder"),
             threads: int | None = None, timings: Timings | None = None,
             guidance_batch: bool = True, precision: str = "auto") -> "Engine":
        """Open ``networks`` (those the folder has; vgt is optional) with ``backend`` in
        ``precision`` (apla_rt.backends.precision: bf16 runs on OpenVINO only, ``auto`` picks it
        there); ``guidance_batch=False`` where the UNet only ever runs on batch 1 (inversion)."""
        precision = check_precision(precision)
        timings = timings or Timings()
        with timings("load"):
            manifest = engine_dir if isinstance(engine_dir, Manifest) else Manifest.open(engine_dir)
            present = tuple(n for n in networks if manifest.has(n) or n != "vgt")
            if precision == "bf16" and backend == "auto":
                backend = "openvino"
            chosen, why = select_backend(backend, manifest, present)
            if backend == "auto" and precision == "auto" and chosen == "ort":
                chosen, why = auto_cpu_backend(manifest, present) or (chosen, why)
            if precision == "bf16":
                if chosen != "openvino":
                    raise InputError(f"--precision bf16 runs on --backend openvino only (backend "
                                     f"{backend} computes in fp32); drop --backend or use openvino")
                from .backends import openvino as openvino_runner

                cpu_precision.require_bf16(cpu_precision.probe_cpu(), openvino_runner.ov_capabilities())
            engine = cls(manifest, chosen, why, threads, timings, guidance_batch=guidance_batch,
                         precision=precision)
        for name in present:
            engine.runner(name)  # times its own loading
        return engine

    def runner(self, name: str) -> Runner:
        if name not in self.runners:
            threads, streams = self.threads, 1
            if name in ("unet", *CACHE_NETWORKS) and self.split_guidance:
                assert threads is not None
                if self.backend == "openvino":
                    streams = 2  # one OpenVINO stream per half, sharing ``threads``
                else:
                    threads = threads - 1  # + the second caller = ``threads`` in all
            with self.timings("load"):
                self.runners[name] = open_runner(self.manifest, name, self.backend, threads,
                                                 precision=self.precision, streams=streams,
                                                 notes=self.notes)
        return self.runners[name]

    @functools.cached_property
    def split_guidance(self) -> bool:
        """Run the guidance batch's two halves (uncond rows, cond rows) as two concurrent
        UNet calls on the one session instead of one call: ONNX Runtime on a CPU with
        ``threads`` given and at least 2 (the session's pool then has ``threads - 1``, the
        second caller makes ``threads``). Small ops parallelise poorly inside one call; two
        calls side by side keep the cores busy (measured in docs/benchmarks.md). The weights
        are not duplicated: an ONNX Runtime session may be run from several threads at once.
        OpenVINO (``--backend openvino``) does the same with two infer requests on two streams.
        Without ``threads`` ONNX Runtime picks its own thread count and the batch stays whole."""
        return (self.guidance_batch and self.backend in ("ort", "openvino") and self.threads is not None
                and self.threads >= 2 and not ort_cuda_available())

    @property
    def has_vgt(self) -> bool:
        return self.manifest.has("vgt")

    @property
    def vgt_reads_source(self) -> bool:
        """The VGT was trained with ``vgt.source``: it also reads the clean source latent."""
        return self.has_vgt and "source" in self.runner("vgt").spec.input_names

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            self.manifest.verify([self.manifest.tokenizer_dir])
            self._tokenizer = ClipTokenizer.load(self.manifest.tokenizer_dir,
                                                 self.manifest.model_max_length)
        return self._tokenizer

    def close(self) -> None:
        if self._halves is not None:  # no half may still be running on a closed runner
            self._halves.shutdown()
            self._halves = None
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        kinds = sorted({r.backend for r in self.runners.values()})
        return f"{', '.join(kinds) or self.backend} ({self.backend_reason})"

    def precisions(self) -> dict[str, str]:
        """What each opened network computes in ("fp32", "fp16" or "bf16")."""
        return {n: str(getattr(r, "precision", "fp32")) for n, r in self.runners.items()}

    def describe_precision(self) -> str:
        """"fp32", "bf16", or per precision the networks in it ("bf16 (unet, vgt), fp32 (...)")."""
        by: dict[str, list[str]] = {}
        for name, p in self.precisions().items():
            by.setdefault(p, []).append(name)
        if len(by) <= 1:
            return next(iter(by), "fp32")
        return ", ".join(f"{p} ({', '.join(names)})" for p, names in sorted(by.items()))

    # -- networks ------------------------------------------------------------------------

    def _run(self, name: str, feeds: dict[str, np.ndarray], preferred: int | None = None) -> np.ndarray:
        """Run a network, splitting dim 0 (batch or frames) into chunks its profile takes."""
        return self._run_outputs(name, feeds, preferred)[self.runner(name).spec.output_names[0]]

    def _run_outputs(self, name: str, feeds: dict[str, np.ndarray],
                     preferred: int | None = None) -> dict[str, np.ndarray]:
        """``_run`` with every output of the network."""
        runner = self.runner(name)
        spec = runner.spec
        limit = _dim0_limit(spec.profile, [spec.input(k).dims[0] for k in feeds])
        n = next(iter(feeds.values())).shape[0]
        chunk = min(x for x in (limit, preferred, n) if x is not None)
        if chunk >= n:
            return runner.run(feeds)
        parts = [runner.run({k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def check_cache(self) -> None:
        """The folder has the DeepCache graphs and they can run on this backend; else one line."""
        missing = [n for n in CACHE_NETWORKS if not self.manifest.has(n)]
        if missing:
            raise InputError(f"--cache-interval above 1 needs the DeepCache graphs {', '.join(CACHE_NETWORKS)}, "
                             f"which the engine folder {self.manifest.root} does not have (exported "
                             "before them, or with --no-cache-graphs); re-export the run, or use "
                             "--cache-interval 1")
        if self.backend == "trt" and any(self.manifest.network(n).engine is None for n in CACHE_NETWORKS):
            raise BackendUnavailable("--cache-interval above 1: the engine folder has no TensorRT engine "
                                     f"for {', '.join(CACHE_NETWORKS)}; re-export with TensorRT, or use "
                                     "--backend ort-cuda / ort-cpu")

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> text embeddings (n, seq, hidden) float32."""
        ids = self.tokenizer(prompts)
        with self.timings("text encoder"):
            return self._run("text_encoder", {"input_ids": ids}).astype(np.float32, copy=False)

    def predict_noise(self, z: np.ndarray, t: int, text: np.ndarray,
                      guidance: float | np.ndarray | None, use_vgt: bool = True,
                      source: np.ndarray | None = None, cache: FeatureCache | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(eps_hat, eps_theta, delta) for z (n, c, f, h, w).

        With guidance, ``text`` is (2n, ...) = [n uncond rows, n cond rows] and ``guidance``
        a scale or one scale per video (n,); without, ``text`` is (n, ...) and ``guidance``
        None. ``source``: the clean latents (n, ...; float32, contiguous), given only to a
        VGT that reads them (``vgt_reads_source``). ``cache``: this sampling run's DeepCache
        (``apla_rt.sampling.deepcache``): the full graph with the feature, or the shallow one on it."""
        n = z.shape[0]
        guided = guidance is not None
        b = 2 * n if guided else n
        if text.shape[0] != b:
            raise ValueError(f"text has {text.shape[0]} rows for {n} videos "
                             f"({'with' if guided else 'without'} guidance)")
        feeds = {"sample": np.concatenate([z, z]) if guided else np.ascontiguousarray(z),
                 "timestep": np.full((b,), t, dtype=np.int64)}
        if self._pinned_text is not text:
            feeds["encoder_hidden_states"] = text
        name, feature = "unet", None
        if cache is not None:
            feature = cache.feature_for(b)
            name = FULL_NETWORK if feature is None else SHALLOW_NETWORK
            if feature is not None:
                feeds["feature"] = feature
        with self.timings("unet" if feature is None else "unet shallow"):
            if guided and self.split_guidance:
                outs = self._run_halves(feeds, text, name)
            else:
                outs = self._run_outputs(name, feeds)
        eps = outs["noise_pred"]
        if cache is not None:
            cache.record(outs.get("feature"))
        if guided:
            scale = np.asarray(guidance, dtype=np.float32)
            scale = scale.reshape((-1,) + (1,) * (z.ndim - 1)) if scale.ndim else scale
            eps_theta = eps[:n] + scale * (eps[n:] - eps[:n])
        else:
            eps_theta = eps
        if use_vgt and self.has_vgt:
            vgt_feeds = {"sample": z, "timestep": np.full((n,), t, dtype=np.int64)}
            if source is not None:  # checked against the VGT's inputs before the loop (_walk)
                vgt_feeds["source"] = source
            with self.timings("vgt"):
                delta = self._run("vgt", vgt_feeds)
        else:
            delta = np.zeros_like(eps_theta)
        return eps_theta + delta, eps_theta, delta

    def _run_halves(self, feeds: dict[str, np.ndarray], text: np.ndarray,
                    name: str = "unet") -> dict[str, np.ndarray]:
        """The UNet (graph ``name``) on the uncond and the cond half of a guidance batch, the
        first on a helper thread; every output, the halves concatenated."""
        n = text.shape[0] // 2
        halves = [{**{k: v[i * n:(i + 1) * n] for k, v in feeds.items()},
                   "encoder_hidden_states": text[i * n:(i + 1) * n]} for i in range(2)]
        self.runner(name)  # opened here, never by both threads at once
        if self._halves is None:
            self._halves = ThreadPoolExecutor(1, thread_name_prefix="apla-unet-half")
        first = self._halves.submit(self._run_outputs, name, halves[0])
        try:
            second = self._run_outputs(name, halves[1])
        finally:
            uncond = first.result()
        return {k: np.concatenate([uncond[k], second[k]]) for k in second}

    @contextlib.contextmanager
    def _text_pinned(self, text: np.ndarray, names: tuple[str, ...] = ("unet",)) -> Iterator[None]:
        """Give the UNet graphs ``names`` ``text`` once for the whole loop (on a GPU it stays there)."""
        runners = [self.runner(name) for name in names]
        limits = [_dim0_limit(r.spec.profile, ["batch"]) for r in runners]
        if any(x is not None and x < text.shape[0] for x in limits) or self.split_guidance:
            yield  # the guidance batch is split: feed the text per call
            return
        for runner in runners:
            runner.set_constant("encoder_hidden_states", text)
        self._pinned_text = text
        try:
            yield
        finally:
            self._pinned_text = None
            for runner in runners:
                runner.set_constant("encoder_hidden_states", None)

    def sample(self, start: np.ndarray, text: np.ndarray, steps: int, guidance: float | np.ndarray,
               use_vgt: bool = True, callback: StepCallback | None = None,
               source: np.ndarray | None = None, *, scheduler: str = "ddim",
               start_timestep: int | None = None,
               guidance_interval: tuple[float, float] | None = None,
               solver_options: Mapping[str, Any] | None = None, cache_interval: int = 1,
               cache_schedule: str = "uniform") -> np.ndarray:
        """Sample from ``start`` (n, c, f, h, w) with classifier-free guidance and
        ``scheduler`` (``apla_rt.sampling.solvers``); ``text`` (2n, ...) as in ``predict_noise``;
        ``guidance`` one scale or one per video; ``source`` the clean latents (n, ...) a
        ``vgt.source`` VGT reads. ``start_timestep``: the timestep ``start`` belongs to (an
        inverted latent's; None: seeded noise's, T - 1). ``guidance_interval`` (lo, hi):
        step i of ``steps`` is guided iff lo <= i / steps < hi; the others run the UNet on
        the conditional rows only (None: every step is guided). ``solver_options``: see
        ``make_solver`` (``karras_sigmas``). ``cache_interval`` > 1 runs the DeepCache graphs
        (``apla_rt.sampling.deepcache``)."""
        cfg = self.manifest.scheduler
        t0 = noise_timestep(cfg) if start_timestep is None else check_start_timestep(cfg, start_timestep)
        solver = make_solver(check_solver(scheduler), cfg, steps, t0, **(solver_options or {}))
        interval = None if guidance_interval is None else check_guidance_interval(guidance_interval)
        cache = None
        if cache_interval > 1:
            self.check_cache()
            cache = FeatureCache.plan(solver.steps, cache_interval, cache_schedule)
        return self._walk(start, solver, text, guidance, use_vgt, source, callback,
                          guided_steps(solver.steps, interval), cache)

    def invert_latents(self, latents: np.ndarray, steps: int, use_vgt: bool = True,
                       callback: StepCallback | None = None) -> np.ndarray:
        """DDIM inversion of clean latents: empty prompt, no guidance, ascending timesteps.

        A VGT trained with ``vgt.source`` gets ``latents`` as its source, as in training."""
        source = np.ascontiguousarray(latents, dtype=np.float32)
        return self._walk(source, DDIMInversion(self.manifest.scheduler, steps),
                          self.encode_text([""]), None, use_vgt, source, callback)

    def _walk(self, z: np.ndarray, solver: Any, text: np.ndarray,
              guidance: float | np.ndarray | None, use_vgt: bool, source: np.ndarray | None,
              callback: StepCallback | None, guided: np.ndarray | None = None,
              cache: FeatureCache | None = None) -> np.ndarray:
        """The loop both directions share: at each of ``solver.timesteps`` predict the noise
        (guided where ``guided[i]``, else from the conditional half of ``text``; through the
        DeepCache graphs with ``cache``), then ``solver.step``."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        if not (use_vgt and self.vgt_reads_source):
            source = None
        elif source is None:
            raise InputError("this model's VGT reads the clean source latent (vgt.source), which "
                             "this call was not given; pass it, or --no-vgt to generate")
        else:
            source = np.ascontiguousarray(source, dtype=np.float32)
        cond_text = np.ascontiguousarray(text[z.shape[0]:]) if guidance is not None else text
        with self._text_pinned(text, CACHE_NETWORKS if cache is not None else ("unet",)):
            for i, t in enumerate(solver.timesteps):
                if guidance is None or guided is None or guided[i]:
                    eps_hat, _, _ = self.predict_noise(z, int(t), text, guidance, use_vgt, source,
                                                       cache)
                else:  # outside the guidance interval: the conditional rows only
                    eps_hat, _, _ = self.predict_noise(z, int(t), cond_text, None, use_vgt, source,
                                                       cache)
                with self.timings("ddim"):
                    z = solver.step(eps_hat, int(t), z)
                if callback is not None:
                    callback(i, int(t))
        return z

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents (1, c, f, h, w) -> uint8 frames (f, H, W, 3), in chunks of frames."""
        z = np.ascontiguousarray(latents[0].transpose(1, 0, 2, 3), dtype=np.float32)
        with self.timings("vae"):
            x = self._run("vae_decoder", {"latent": z}, preferred=DECODE_CHUNK)
        return images_to_frames(x)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames (f, H, W, 3) -> scaled latents (1, c, f, h, w)."""
        with self.timings("vae"):
            z = self._run("vae_encoder", {"image": frames_to_images(frames)}, preferred=DECODE_CHUNK)
        return np.ascontiguousarray(z.transpose(1, 0, 2, 3)[None], dtype=np.float32)


def frames_to_images(frames: np.ndarray) -> np.ndarray:
    """uint8 (f, h, w, 3) -> float32 (f, 3, h, w) in [-1, 1]."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - 1


def images_to_frames(x: np.ndarray) -> np.ndarray:
    """float (f, 3, h, w) in [-1, 1] -> uint8 (f, h, w, 3)."""
    x = np.round((np.clip(x.astype(np.float32), -1, 1) + 1) * np.float32(127.5))
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.uint8)


# --------------------------------------------------------------------------- start latents


def start_latent(manifest: Manifest, frames: int | None, seed: int, from_noise: bool,
                 latent: str | os.PathLike | None) -> np.ndarray:
    """The start latent for ``generate``: a .npy file, seeded noise, or the manifest's."""
    if latent is not None and from_noise:
        raise InputError("--latent and --from-noise exclude each other; give one")
    if latent is not None:
        z = check_latent(load_npy(Path(latent)), manifest.latent_channels, f"--latent {latent}")
        return check_start_frames(z, frames, manifest, f"--latent {latent}")
    if from_noise or manifest.start_latent_path is None:
        if not from_noise:
            raise InputError(f"the engine folder {manifest.root} has no start latent; pass "
                             "--from-noise (or --latent FILE.npy)")
        n = check_frames(frames, manifest) if frames is not None else manifest.frame_range()[1]
        h, w = manifest.latent_size()
        rng = np.random.default_rng(seed)
        return rng.standard_normal((1, manifest.latent_channels, n, h, w)).astype(np.float32)
    check_manifest_start_frames(manifest, frames)
    return manifest.load_start_latent()


def check_manifest_start_frames(manifest: Manifest, frames: int | None) -> None:
    """``--frames`` against the engine folder's start latent (which it must equal)."""
    shape = manifest.start_latent_shape()
    assert shape is not None
    if frames is not None:
        check_frames(frames, manifest)
        if frames != shape[2]:
            raise InputError(f"--frames {frames} differs from the {shape[2]} frames of the engine "
                             f"folder's start latent; pass --from-noise to start from noise")


def check_start_frames(z: np.ndarray, frames: int | None, manifest: Manifest, what: str) -> np.ndarray:
    """A given start latent ``z`` against ``--frames`` and the engines' frame range."""
    if frames is not None and frames != z.shape[2]:
        raise InputError(f"--frames {frames} differs from the {z.shape[2]} frames of {what}; "
                         "drop --frames or pass --from-noise")
    check_frames(z.shape[2], manifest, "the latent's frame count")
    return z
