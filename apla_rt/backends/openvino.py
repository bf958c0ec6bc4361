"""The runtime's OpenVINO runner (``--backend openvino``): OpenVINO's CPU plugin on the folder's
portable ONNX graphs (``unet.onnx``; ONNX Runtime's fused-attention ``unet.ort.onnx`` is not
for it), in fp32 or bf16 (``apla_rt.backends.precision``), or on a network's int8 model (the
OpenVINO IR ``apla-export --int8`` wrote, ``apla_rt.folder.int8``), its layers left in float
computing in fp32 as when its fidelity was measured.

What the ONNX Runtime runner does, the same way: ``threads`` CPU threads
(``INFERENCE_NUM_THREADS``); concurrent ``run`` calls (the guidance halves of
``Engine.split_guidance``) each take an infer request of their own from a pool, on
``streams`` OpenVINO streams sharing the threads; ``set_constant`` inputs (the text embeddings)
are set on each request once and stay there for later calls; feeds are checked against the
manifest; the file is hashed against the manifest while OpenVINO compiles it and the runner is
handed out only if it matched.

Compiled models are cached (OpenVINO's ``CACHE_DIR``) under the user cache folder, in a folder
named after the file's sha256 (an int8 IR's: of its graph and weights) and the precision
(``cache_dir()/openvino/<sha256>/<precision>``):
a second start loads the compiled blob instead of compiling. One folder per precision because
OpenVINO 2026.4's blob key leaves the inference precision out: in a shared folder a bf16
compile loaded the fp32 blob and answered NaN (the VGT) or crashed (the UNet), on an AMX Xeon.
OpenVINO is imported when a runner is made.
"""

from __future__ import annotations

import hashlib
import queue
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import precision as cpu_precision
from .compare import run_check, seeded_feeds
from .precision import CHECK_SEEDS, CpuInfo, VerdictCache, cache_dir, verdict_key
from ..errors import AplaError, BackendUnavailable, IntegrityError
from ..folder.manifest import Manifest, NetworkSpec
from .ort import OrtRunner, _ConstantsMixin, _onnx_files

# INFERENCE_PRECISION_HINT per precision: an int8 model's float layers (those NNCF's accuracy
# control kept in float) compute in f32, as NNCF's and export's checks ran them.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("OpenVINO is not installed: pip install -e \".[cpu,openvino]\"") from None
    return openvino


def openvino_status() -> tuple[bool, str]:
    """Whether OpenVINO is importable here; else False and a one-line reason."""
    try:
        _openvino()
    except BackendUnavailable as err:
        return False, str(err)
    return True, ""


def ov_version() -> str:
    return str(_openvino().__version__)


def ov_capabilities() -> tuple[str, ...]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (``BF16`` where it runs bf16)."""
    core = _openvino().Core()
    return tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def model_cache_dir(sha256: str) -> Path:
    return cache_dir() / "openvino" / sha256


class OvRunner(_ConstantsMixin):
    """One network compiled by OpenVINO's CPU plugin (see the module docstring)."""

    def __init__(self, spec: NetworkSpec, path: Path, precision: str = "fp32",
                 threads: int | None = None, streams: int = 1, cache: Path | None = None):
        ov = _openvino()
        try:
            compiled = ov.Core().compile_model(str(path), "CPU",
                                               compile_config(precision, threads, streams, cache))
        except Exception as err:  # OpenVINO raises RuntimeError for any graph it cannot read
            first = " ".join(str(err).split())[:300]
            raise AplaError(f"OpenVINO {ov.__version__} cannot compile {path.name} ({first}); "
                            "use --backend ort-cpu or re-export the run") from err
        self._bind(spec, compiled, precision, path.name)

    @classmethod
    def from_compiled(cls, spec: NetworkSpec, compiled: Any, precision: str, label: str) -> "OvRunner":
        """A runner over a model compiled elsewhere (export's int8 candidates, compiled by NNCF)."""
        runner = cls.__new__(cls)
        runner._bind(spec, compiled, precision, label)
        return runner

    def _bind(self, spec: NetworkSpec, compiled: Any, precision: str, label: str) -> None:
        self.spec = spec
        self.precision = precision
        self.backend = "openvino-cpu" + (f"-{precision}" if precision in ("bf16", "int8") else "")
        self._constants = {}
        self.compiled = compiled
        self.loaded_from_cache = bool(self._property("LOADED_FROM_CACHE", False))
        self._in_ports = self._ports(compiled.inputs, spec.input_names, "inputs", label)
        self._out_ports = self._ports(compiled.outputs, spec.output_names, "outputs", label)
        self._pool: queue.SimpleQueue[tuple[Any, dict[str, np.ndarray]]] = queue.SimpleQueue()

    def _property(self, name: str, default: Any) -> Any:
        try:
            return self.compiled.get_property(name)
        except Exception:  # a property this OpenVINO version does not expose
            return default

    def _ports(self, ports: Any, names: tuple[str, ...], what: str, label: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for i, port in enumerate(ports):
            for name in names:
                if name in port.get_names():
                    found[name] = i
        if set(found) != set(names):
            got = sorted(n for p in ports for n in p.get_names())
            raise IntegrityError(f"{label} has {what} {got}, but the manifest lists "
                                 f"{list(names)}; re-run the export")
        return found

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ov = _openvino()
        merged = self._feeds(feeds)
        try:
            request, pinned = self._pool.get_nowait()
        except queue.Empty:
            request, pinned = self.compiled.create_infer_request(), {}
        try:
            given: dict[int, np.ndarray] = {}
            for name, value in merged.items():
                port = self._in_ports[name]
                if name in self._constants and name not in feeds:
                    # set once per request: the request keeps it for later calls
                    if pinned.get(name) is not self._constants[name]:
                        request.set_input_tensor(port, ov.Tensor(self._constants[name], shared_memory=True))
                        pinned[name] = self._constants[name]
                else:
                    given[port] = value
                    pinned.pop(name, None)
            request.infer(given, share_inputs=True)
            out = {name: np.array(request.get_output_tensor(i).data, copy=True)
                   for name, i in self._out_ports.items()}
        finally:
            self._pool.put((request, pinned))
        return out

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break


def compile_config(precision: str, threads: int | None = None, streams: int = 1,
                   cache: Path | None = None) -> dict[str, Any]:
    """OpenVINO's CPU settings for a runner in ``precision`` (the compiled-model cache in a
    folder per precision, module docstring)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                              "NUM_STREAMS": int(streams)}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache is not None:
        cache = cache / precision
        cache.mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache)
    return config


# --------------------------------------------------------------------------- opening


def open_ov_runner(manifest: Manifest, name: str, threads: int | None = None,
                   precision: str = "fp32", streams: int = 1) -> OvRunner:
    """Verify the network's file while OpenVINO compiles it in ``precision``: the portable
    ONNX file in "fp32" or "bf16", the int8 model in "int8" (decided by
    ``apla_rt.backends.placement``: bf16 only after its check, int8 only where its recorded
    check passed)."""
    spec = manifest.network(name)
    if precision == "int8":
        path, sha, files = _int8_model(manifest, name)
    else:
        path, sha = _portable(manifest, spec)
        files = _onnx_files(manifest, spec, path)
    pending = manifest.verify_in_background(files)
    runner: OvRunner | None = None
    try:
        runner = OvRunner(spec, path, precision, threads, streams, model_cache_dir(sha))
        pending.wait()
    except BaseException:
        pending.wait()  # a file that does not match its hash explains a failed load best
        if runner is not None:
            runner.close()
        raise
    return runner


def _portable(manifest: Manifest, spec: NetworkSpec) -> tuple[Path, str]:
    """The network's portable ONNX file and its sha256 (OpenVINO's cache key)."""
    if spec.onnx is None:
        raise BackendUnavailable(f"the engine folder has no portable ONNX file for {spec.name} "
                                 "(OpenVINO reads unet.onnx, not unet.ort.onnx); re-export the run")
    sha = manifest.files.get(manifest.rel(spec.onnx))
    if sha is None:
        raise IntegrityError(f"{manifest.rel(spec.onnx)} is used but has no sha256 in 'files'")
    return spec.onnx, sha


def _int8_model(manifest: Manifest, name: str) -> tuple[Path, str, list[str]]:
    """The network's int8 IR, the compiled-model cache's key (its graph's and weights'
    sha256) and the files to verify; refused unless its recorded check passed."""
    ok, why = cpu_precision.int8_available(manifest, name)
    model = manifest.int8.get(name)
    if not ok or model is None:
        raise BackendUnavailable(f"{name} cannot run in int8: {why}")
    files = [manifest.rel(p) for p in model.files]
    key = hashlib.sha256("".join(manifest.files[f] for f in files).encode()).hexdigest()
    return model.model, key, files


def bf16_verdict(manifest: Manifest, name: str, threads: int | None, cpu: CpuInfo,
                 run: bool = True, token_ids: np.ndarray | None = None) -> dict[str, Any] | None:
    """The network's bf16 check on this machine: the cached verdict, else (``run``) the check
    run now and cached (``bf16_check``), else None."""
    spec = manifest.network(name)
    path, sha = _portable(manifest, spec)
    verdicts = VerdictCache()
    key = verdict_key(cpu, ov_version(), sha, spec.name, cpu_precision.BF16_TOLERANCE)
    verdict = verdicts.get(key)
    if verdict is None and run:
        manifest.verify(_onnx_files(manifest, spec, path))
        bf16 = OvRunner(spec, path, "bf16", threads, 1, model_cache_dir(sha))
        try:
            verdict = bf16_check(manifest, spec, path, bf16, threads, token_ids)
        finally:
            bf16.close()
        verdicts.put(key, verdict)
    return verdict


def bf16_check(manifest: Manifest, spec: NetworkSpec, path: Path, bf16: OvRunner,
               threads: int | None, token_ids: np.ndarray | None) -> dict[str, Any]:
    """``bf16`` against ONNX Runtime fp32 on the same file, seeded inputs at the opt shape."""
    if token_ids is None and "input_ids" in spec.input_names:
        token_ids = prompt_token_ids(manifest)
    timesteps = int(manifest.scheduler.num_train_timesteps)
    feeds = [seeded_feeds(spec, s, token_ids, timesteps) for s in CHECK_SEEDS]
    reference = OrtRunner(spec, path, threads=threads)
    try:
        verdict = run_check(reference.run, bf16.run, feeds, cpu_precision.BF16_TOLERANCE)
    finally:
        reference.close()
    return verdict


def prompt_token_ids(manifest: Manifest) -> np.ndarray:
    """Token ids of real prompts (the run's, the empty one and two others) for the text
    encoder's check."""
    from ..media.tokenizer import ClipTokenizer

    manifest.verify([manifest.tokenizer_dir])
    tok = ClipTokenizer.load(manifest.tokenizer_dir, manifest.model_max_length)
    prompts = ["", manifest.prompt or "a video", "a panda is surfing at sunset", "a red car turns"]
    return np.asarray(tok(prompts), dtype=np.int64)
