"""int8 models checked before they are trusted: ``apla-export --int8`` (a new export) and
``apla-export --int8 --engine-dir DIR`` (an existing engine folder) quantize the UNet graphs
the runtime runs (``unet_feature``, which serves every full UNet call where the folder has it,
else ``unet``; and ``unet_shallow``) and the VAE decoder with NNCF for OpenVINO, under accuracy
control, and record each network's end-to-end fidelity in the manifest
(``apla_rt.folder.int8``).

* **Calibration** from the model's own sampling trajectories: the runtime itself
  (``apla_rt.Pipeline`` on the folder's fp32 ONNX, ONNX Runtime) samples ``CALIBRATION``: the
  run's inverted start latent with the training prompt, seeded noise with it, and the inverted
  latent with an edit prompt, with the run's settings (steps, guidance, solver); a recorder
  around ``pool.unet`` (the method the loop calls) keeps the UNet's inputs at every step, so
  every timestep of the trajectories is covered. The shallow cache graph's items add the
  feature the fp32 ``unet_feature`` computes for those inputs; the VAE decoder's are the
  latents the sampled videos end at.
* **Accuracy control**: ``nncf.quantize_with_accuracy_control`` reverts the layers that hurt
  most to float until its validation function holds within the budget. That function measures
  the end result on inputs not used for calibration (``VALIDATION``: other seeds and another
  prompt): the candidate, compiled, runs in the real loop in place of the network's runner, and
  its videos' frames are compared with the fp32 videos sampled with the same settings (PSNR,
  capped at ``PSNR_CEILING_DB``; the budget is ``MAX_DROP_DB`` below it).
* **The record**: the model NNCF returns is written as OpenVINO IR, opened the way the runtime
  opens it (``OvRunner``, precision "int8") and measured once more on the validation cases;
  that measurement is what the manifest records, passed or not. A network accuracy control
  could not bring within the budget (or that ran out of ``minutes``) is recorded with its miss
  and never runs.

The full UNet graph is checked sampling without the cache (every call a full one); the shallow
graph sampling with ``CACHE_INTERVAL``, after the feature graph, with the feature graph's int8
model in place where it passed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from apla_rt import Pipeline
from apla_rt.api import Video
from apla_rt.backends.placement import serving_graph
from apla_rt.errors import InputError, OutputExistsError
from apla_rt.folder.atomic import atomic_dir, write_text
from apla_rt.folder.int8 import MAX_DROP_DB, QUANTIZABLE, SECTION, fidelity
from apla_rt.folder.manifest import MANIFEST_NAME, Manifest, sha256_file
from apla_rt.media.video import psnr
from apla_rt.sampling.settings import SamplingSettings, check_steps

from .lock import export_lock

Feeds = dict[str, np.ndarray]
Log = Callable[[str], None]

CALIBRATION_EDIT = "a panda is surfing at sunset"
VALIDATION_EDIT = "a red car drives through a snowy forest"
CACHE_INTERVAL = 2  # the shallow graph's check samples with the full graph every 2nd step
# Layers are ranked (each reverted to float in turn, compiled and sampled) on the validation
# case int8 moved most: the budget holds for the worst case, and one case per candidate keeps
# the ranking's hundreds of compiles and loops affordable.
RANKING_CASES = 1


@dataclass(frozen=True)
class Case:
    """One video sampled for calibration or validation: its prompt (None: the run's training
    prompt), its seed, and whether it starts from seeded noise or the folder's inverted latent."""

    name: str
    prompt: str | None
    seed: int
    from_noise: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "seed": self.seed,
                "start": "noise" if self.from_noise else "inverted latent"}


CALIBRATION = (Case("inverted", None, 0, False), Case("noise", None, 0, True),
               Case("edit", CALIBRATION_EDIT, 0, False))
VALIDATION = (Case("noise-seed-1", None, 1, True), Case("edit-2", VALIDATION_EDIT, 0, False),
              Case("edit-2-noise-seed-2", VALIDATION_EDIT, 2, True))


def cases_for(manifest: Manifest, cases: tuple[Case, ...], seed_base: int) -> tuple[Case, ...]:
    """``cases`` as this folder can sample them: without a start latent, from noise (other seeds)."""
    if manifest.start_latent_path is not None:
        return cases
    return tuple(replace(c, from_noise=True, seed=c.seed if c.from_noise else seed_base + i)
                 for i, c in enumerate(cases))


@dataclass(frozen=True)
class Int8Options:
    """What ``--int8`` quantizes and how (``apla-export --int8-*``)."""

    networks: tuple[str, ...] | None = None  # None: every quantizable network the folder has
    steps: int | None = None  # sampling steps of the cases (None: the run's)
    max_drop_db: float = MAX_DROP_DB  # the fidelity budget (apla_rt.folder.int8)
    minutes: float = 60.0  # accuracy control's time per network; then what it has is measured
    threads: int | None = None
    force: bool = False  # replace int8 models the folder already has

    def check(self) -> "Int8Options":
        if self.networks is not None:
            unknown = [n for n in self.networks if n not in QUANTIZABLE]
            if unknown or not self.networks:
                raise InputError(f"--int8-networks takes {', '.join(QUANTIZABLE)}, got "
                                 f"{', '.join(self.networks) or 'nothing'}")
        if self.steps is not None:
            check_steps(self.steps, "--int8-steps")
        for flag, value, low in (("--int8-max-drop", self.max_drop_db, 0.0), ("--int8-minutes", self.minutes, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value < low if low is not None else value <= 0):
                raise InputError(f"{flag} must be a {'number >= 0' if low is not None else 'positive number'}, "
                                 f"got {value!r}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise InputError(f"--threads must be between 1 and 1024 (got {self.threads})")
        return self

    def chosen(self, manifest: Manifest) -> tuple[str, ...]:
        """The networks to quantize, in order (the shallow graph after the feature graph).
        ``unet`` where the folder serves the UNet's calls on the feature graph
        (``serving_graph``) means that graph: the plain one never runs there."""
        served = serving_graph(manifest, "unet")
        present = tuple(n for n in QUANTIZABLE if manifest.has(n) and not (n == "unet" and served != n))
        if self.networks is None:
            return present
        asked = tuple(dict.fromkeys(served if n == "unet" else n for n in self.networks))
        missing = [n for n in asked if n not in present]
        if missing:
            raise InputError(f"the engine folder {manifest.root} has no {', '.join(missing)} "
                             f"network; it has {', '.join(present)}")
        return tuple(n for n in present if n in asked)


# --------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def recording(pipe: Pipeline) -> Iterator[list[Feeds]]:
    """The UNet's inputs at every step of the loops run inside: a wrapper around ``pool.unet``,
    the method the loop calls (the warm-up does not)."""
    pool = pipe.engine.pool
    inner, seen = pool.unet, []

    def recorded(graph: str, feeds: Mapping[str, np.ndarray], halves: bool) -> dict[str, np.ndarray]:
        seen.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return inner(graph, feeds, halves)

    pool.unet = recorded
    try:
        yield seen
    finally:
        del pool.unet  # the class's method again


def sample(pipe: Pipeline, cases: tuple[Case, ...], settings: SamplingSettings) -> list[Video]:
    """One video per case, with ``settings`` (complete)."""
    prompt = pipe.manifest.prompt or ""
    return [pipe.generate(c.prompt or prompt, seeds=c.seed, from_noise=c.from_noise, settings=settings)[0]
            for c in cases]


def decoder_feeds(pipe: Pipeline, latents: np.ndarray) -> list[Feeds]:
    """The VAE decoder's inputs for one video's latents (1, c, f, h, w), in the chunks its
    profile takes."""
    z = np.ascontiguousarray(latents[0].transpose(1, 0, 2, 3), dtype=np.float32)
    most = pipe.manifest.network("vae_decoder").profile.get("frames", (1, 1, z.shape[0]))[2]
    return [{"latent": z[i:i + most]} for i in range(0, z.shape[0], most)]


@dataclass
class Trajectories:
    """What the fp32 runtime sampled for one folder: the calibration items per network and the
    validation references per sampling setting."""

    settings: SamplingSettings  # the run's, cache off
    unet_feeds: list[Feeds]
    decoder_feeds: list[Feeds]
    references: dict[int, list[Video]]  # cache interval -> the fp32 validation videos
    timesteps: list[int]

    @classmethod
    def collect(cls, pipe: Pipeline, networks: tuple[str, ...], steps: int | None) -> "Trajectories":
        m = pipe.manifest
        settings = pipe.settings_for(SamplingSettings(steps=steps, cache_interval=1))
        with recording(pipe) as seen:
            videos = sample(pipe, cases_for(m, CALIBRATION, 10), settings)
        dec = [f for v in videos for f in decoder_feeds(pipe, v.latents)]
        intervals = [1] + ([CACHE_INTERVAL] if "unet_shallow" in networks else [])
        refs = {k: sample(pipe, cases_for(m, VALIDATION, 20), settings.replace(cache_interval=k))
                for k in intervals}
        timesteps = sorted({int(t) for f in seen for t in f["timestep"]}, reverse=True)
        return cls(settings, seen, dec, refs, timesteps)

    def calibration(self, pipe: Pipeline, name: str) -> list[Feeds]:
        """The calibration items of network ``name``."""
        if name == "vae_decoder":
            return self.decoder_feeds
        if name != "unet_shallow":
            return self.unet_feeds
        pipe.engine.pool.open(("unet_feature",))
        return [{**f, "feature": pipe.engine.pool.run_outputs("unet_feature", f)["feature"]}
                for f in self.unet_feeds]

    def recipe(self, name: str, manifest: Manifest) -> dict[str, Any]:
        """How the calibration and validation sets were made (the manifest records it)."""
        s = self.settings.to_dict()
        sampled = {k: s[k] for k in ("steps", "guidance", "scheduler")}
        interval = CACHE_INTERVAL if name == "unet_shallow" else 1
        items = len(self.decoder_feeds if name == "vae_decoder" else self.unet_feeds)
        return {"calibration": {"cases": [c.to_dict() for c in cases_for(manifest, CALIBRATION, 10)],
                                **sampled, "items": items, "every_step": True,
                                "timesteps": {"first": self.timesteps[0], "last": self.timesteps[-1],
                                              "count": len(self.timesteps)}},
                "validation": {"cases": [c.to_dict() for c in cases_for(manifest, VALIDATION, 20)],
                               **sampled, "cache_interval": interval,
                               "reference": "the same cases sampled in fp32 (ONNX Runtime)"}}


# --------------------------------------------------------------------------- validation


class OutOfTime(BaseException):
    """Accuracy control's time is up (a BaseException: NNCF's evaluator catches Exception)."""


class Validator:
    """NNCF's validation function for one network (module docstring): ``(compiled model,
    case indices) -> (worst PSNR, per-case PSNRs)``; ``measure`` takes a runner."""

    def __init__(self, pipe: Pipeline, name: str, trajectories: Trajectories):
        self.pipe, self.name, self.t = pipe, name, trajectories
        self.interval = CACHE_INTERVAL if name == "unet_shallow" else 1
        self.deadline: float | None = None
        self.calls = 0
        self.full: list[float] = []  # the worst PSNR of each call on every case, in order

    def __call__(self, compiled: Any, items: Any) -> tuple[float, list[float]]:
        from apla_rt.backends.openvino import OvRunner

        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime()
        self.calls += 1
        spec = self.pipe.manifest.network(self.name)
        cases = [int(i) for i in items]
        values = self.measure(OvRunner.from_compiled(spec, compiled, "int8", f"{self.name} candidate"), cases)
        if len(cases) == len(self.t.references[self.interval]):
            self.full.append(min(values))
        return min(values), values

    def best_candidate(self) -> float | None:
        """The best worst-case PSNR among the quantized candidates checked on every case (the
        first such call is NNCF's check of the fp32 model), or None."""
        return max(self.full[1:]) if len(self.full) > 1 else None

    def measure(self, runner: Any, items: list[int] | None = None) -> list[float]:
        """PSNR (dB, capped) of each validation case with ``runner`` in place of the network."""
        refs = self.t.references[self.interval]
        items = list(range(len(refs))) if items is None else items
        pool = self.pipe.engine.pool
        before = pool.runners.get(self.name)
        pool.runners[self.name] = runner
        try:
            if self.name == "vae_decoder":
                got = [self.pipe.engine.decode(refs[i].latents) for i in items]
            else:
                cases = cases_for(self.pipe.manifest, VALIDATION, 20)
                settings = self.t.settings.replace(cache_interval=self.interval)
                got = [v.frames for v in sample(self.pipe, tuple(cases[i] for i in items), settings)]
        finally:
            if before is None:
                pool.runners.pop(self.name, None)
            else:
                pool.runners[self.name] = before
        return fidelity([psnr(g, refs[i].frames) for g, i in zip(got, items)])["psnr_db"]


# --------------------------------------------------------------------------- one network


def quantize_network(pipe: Pipeline, name: str, trajectories: Trajectories, options: Int8Options,
                     scratch: Path, log: Log) -> tuple[Any, dict[str, Any]]:
    """NNCF's accuracy-controlled quantization of ``name``: (the OpenVINO model, how it went)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
    from openvino._offline_transformations import compress_quantize_weights_transformation

    spec = pipe.manifest.network(name)
    assert spec.onnx is not None
    model = ov.Core().read_model(str(spec.onnx))
    calibration = trajectories.calibration(pipe, name)
    validator = Validator(pipe, name, trajectories)
    started = time.monotonic()
    validator.deadline = started + options.minutes * 60
    finished = True
    try:
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calibration), nncf.Dataset(list(range(len(VALIDATION)))), validator,
            max_drop=float(options.max_drop_db), drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                ranking_subset_size=RANKING_CASES, intermediate_model_dir=str(scratch)))
    except OutOfTime:
        finished = False
        log(f"{name}: accuracy control ran out of its {options.minutes:g} minutes; the "
            "post-training model is measured")
        quantized = ov.Core().read_model(str(scratch / "intermediate_model.xml"))
        compress_quantize_weights_transformation(quantized)  # int8 weights, as NNCF stores them
    control = {"tool": "nncf.quantize_with_accuracy_control", "model_type": "transformer",
               "drop_type": "absolute", "ranking_cases": RANKING_CASES, "max_drop_db": float(options.max_drop_db),
               "minutes": options.minutes, "finished": finished, "validations": validator.calls,
               "best_candidate_worst_db": validator.best_candidate(),
               "seconds": round(time.monotonic() - started, 1)}
    return quantized, control


def write_checked(pipe: Pipeline, name: str, quantized: Any, validator: Validator, folder: Path,
                  options: Int8Options, scratch: Path) -> tuple[dict[str, Any], Any] | None:
    """Write ``quantized`` as ``NAME.int8.xml/.bin`` into ``folder``, open it as the runtime
    does and measure it: (its record's files and fidelity, the runner) or None where no layer
    was left in int8."""
    import openvino as ov

    from apla_rt.backends.openvino import OvRunner

    quantizers = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    if quantizers == 0:
        return None
    staged = scratch / f"{name}.int8.xml"
    ov.save_model(quantized, str(staged), compress_to_fp16=False)
    runner = OvRunner(pipe.manifest.network(name), staged, "int8", options.threads)
    measured = fidelity(validator.measure(runner), options.max_drop_db)
    for suffix in (".xml", ".bin"):
        os.replace(staged.with_suffix(suffix), folder / f"{name}.int8{suffix}")
    return {"model": f"{name}.int8.xml", "weights": f"{name}.int8.bin", "fidelity": measured,
            "quantizers": quantizers}, runner


# --------------------------------------------------------------------------- a folder


def quantize_into(folder: Path, options: Int8Options, log: Log) -> dict[str, Any]:
    """Quantize the networks of ``folder`` (a folder being built: written in place) and add
    their records to its manifest; returns the manifest's int8 section."""
    import nncf
    import openvino as ov

    manifest = Manifest.open(folder)
    names = options.chosen(manifest)
    records: dict[str, Any] = {}
    with Pipeline.open(folder, "ort-cpu", options.threads, precision="fp32", cache=False) as pipe:
        trajectories = Trajectories.collect(pipe, names, options.steps)
        for name in names:  # the candidates take their places: no fp32 copy held beside them
            if name != "vae_decoder" and pipe.engine.pool.has(name):
                pipe.engine.pool.runners.pop(name).close()
        log(f"int8: {len(trajectories.unet_feeds)} UNet calls recorded over {len(trajectories.timesteps)} "
            f"timesteps ({trajectories.timesteps[0]}..{trajectories.timesteps[-1]}) for calibration")
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f".{name}.int8-", dir=folder.parent) as tmp:
                quantized, control = quantize_network(pipe, name, trajectories, options, Path(tmp), log)
                done = write_checked(pipe, name, quantized, Validator(pipe, name, trajectories),
                                     folder, options, Path(tmp))
            if done is None:
                log(f"{name}: accuracy control left every layer in float: no int8 model written")
                continue
            record, runner = done
            onnx = manifest.rel(manifest.network(name).onnx)  # type: ignore[arg-type]
            records[name] = {**record, "source": onnx, "source_sha256": manifest.files[onnx],
                             **trajectories.recipe(name, manifest), "accuracy_control": control,
                             "versions": {"nncf": nncf.__version__, "openvino": ov.__version__},
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            fid = record["fidelity"]
            log(f"{name}: int8 {fid['worst_db']:.2f} dB PSNR vs fp32 at worst (drop {fid['drop_db']:.2f} "
                f"dB, budget {fid['max_drop_db']:g}): {'passed' if fid['passed'] else 'MISSED, not used'}")
            if fid["passed"] and name != "vae_decoder":  # the later graphs' checks run with it
                pipe.engine.pool.runners[name] = runner
    return record_int8(folder, records)


def record_int8(folder: Path, records: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``records`` (and their files' sha256) to ``folder``'s manifest, written atomically;
    checked by reading it back."""
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    section = dict(data.get(SECTION) or {})
    for name, record in records.items():
        section[name] = record
        for key in ("model", "weights"):
            data["files"][record[key]] = sha256_file(folder / record[key])
    data[SECTION] = section
    write_text(path, json.dumps(data, indent=2) + "\n", force=True)  # a new file: never a linked one
    Manifest.open(folder)
    return section


def add_int8(engine_dir: str | os.PathLike, options: Int8Options, log: Log = print) -> dict[str, Any]:
    """Add int8 models to an existing engine folder, atomically: the new folder is built beside
    it (its files hard-linked, never written through) and swapped in when everything is written;
    int8 models it already has are replaced only with ``force``."""
    root = Path(engine_dir)
    options = options.check()
    manifest = Manifest.open(root)
    names = options.chosen(manifest)
    present = [n for n in names if n in manifest.int8]
    if present and not options.force:
        raise OutputExistsError(f"the engine folder {root} already has int8 models for "
                                f"{', '.join(present)}; pass --force to replace them")
    replaced = {manifest.rel(p) for n in present for p in manifest.int8[n].files}
    with export_lock(root), atomic_dir(root, force=True) as tmp:
        link_tree(root, tmp, skip=replaced | {MANIFEST_NAME})
        write_text(tmp / MANIFEST_NAME, _without(manifest, present))
        section = quantize_into(tmp, options, log)
    log(f"int8 models recorded in {root / MANIFEST_NAME}")
    return section


def _without(manifest: Manifest, names: list[str]) -> str:
    """The manifest's JSON without the int8 records (and their files) of ``names``."""
    data = json.loads(json.dumps(manifest.data))
    for name in names:
        record = data[SECTION].pop(name)
        for key in ("model", "weights"):
            data["files"].pop(record[key], None)
    return json.dumps(data, indent=2) + "\n"


def link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link every file under ``src`` into ``dst`` (copy where links are refused), except
    the relative paths in ``skip``."""
    import shutil

    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if rel in skip or not path.is_file():
            if path.is_dir():
                (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
