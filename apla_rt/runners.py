"""One runner per network: ``run(feeds) -> outputs``, NumPy in and out.

* ``OrtRunner``: ONNX Runtime, CPU provider; with onnxruntime-gpu and a visible GPU the CUDA
  provider with I/O binding: inputs given to ``set_constant`` (the text embeddings) are
  uploaded once and stay on the device for every later call, outputs are bound on the
  device and copied back once per call (the DDIM math is float64 NumPy, so the latent makes
  one round trip per step).
* ``TrtRunner``: a TensorRT engine (``.plan``) through Polygraphy's ``TrtRunner`` and
  ``EngineFromBytes``, imported only when such a runner is made.

Every runner checks its feeds against the manifest (names, dtypes, dims, profile ranges)
before running. ``select_backend`` implements ``--backend auto|ort|trt``: auto takes
TensorRT when every network has an engine and TensorRT and a CUDA GPU are usable here,
else ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from .errors import AplaError, BackendUnavailable, IntegrityError
from .gpu import cuda_device_count, trt_available
from .manifest import Manifest, NetworkSpec

BACKENDS = ("auto", "ort", "trt")


class Runner(Protocol):
    """What the pipeline needs from a network."""

    spec: NetworkSpec
    backend: str  # "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt"

    def set_constant(self, name: str, value: np.ndarray | None) -> None: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class _ConstantsMixin:
    """``set_constant``: an input reused by every later ``run`` unless a feed overrides it."""

    spec: NetworkSpec
    _constants: dict[str, np.ndarray]

    def set_constant(self, name: str, value: np.ndarray | None) -> None:
        if name not in self.spec.input_names:
            raise KeyError(f"{self.spec.name} has no input {name!r}")
        if value is None:
            self._constants.pop(name, None)
        else:
            self._constants[name] = np.ascontiguousarray(value)
        self._constants_changed(name)

    def _constants_changed(self, name: str) -> None:
        pass

    def _feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        merged = {**self._constants, **feeds}
        self.spec.check_feeds(merged)
        return {k: np.ascontiguousarray(v) for k, v in merged.items()}


# --------------------------------------------------------------------------- availability


def ort_cuda_available() -> bool:
    """onnxruntime-gpu is installed and a CUDA GPU is visible."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count()[0] > 0


def select_backend(requested: str, manifest: Manifest, networks: tuple[str, ...]) -> tuple[str, str]:
    """("trt" | "ort", why) for ``--backend requested`` and the networks to be run."""
    if requested not in BACKENDS:
        raise AplaError(f"unknown backend {requested!r}; use one of {', '.join(BACKENDS)}")
    specs = [manifest.network(n) for n in networks]
    no_engine = [s.name for s in specs if s.engine is None]
    no_onnx = [s.name for s in specs if s.onnx is None]
    if requested == "ort" or (requested == "auto" and no_engine):
        if no_onnx:
            raise BackendUnavailable(f"the engine folder has no ONNX file for {', '.join(no_onnx)}; "
                                     "use --backend trt or re-export with ONNX files")
        return "ort", ("requested" if requested == "ort"
                       else f"no TensorRT engine for {', '.join(no_engine)}")
    if requested == "trt" and no_engine:
        raise BackendUnavailable(f"--backend trt: the engine folder has no TensorRT engine for "
                                 f"{', '.join(no_engine)}; build engines with apla-export on a "
                                 "machine with TensorRT, or use --backend ort")
    ok, why = trt_available()
    if ok:
        return "trt", "requested" if requested == "trt" else "TensorRT engines and a GPU are available"
    if requested == "trt" or no_onnx:
        raise BackendUnavailable(f"--backend trt: {why}; or use --backend ort")
    return "ort", why


def open_runner(manifest: Manifest, name: str, backend: str, threads: int | None = None) -> Runner:
    """Verify the network's file against the manifest, then load it with ``backend``."""
    spec = manifest.network(name)
    if backend == "trt":
        assert spec.engine is not None
        return TrtRunner(spec, spec.engine, manifest.read_verified(spec.engine))
    onnx = spec.onnx_ort or spec.onnx  # the fused-attention flavour where the export wrote one
    if onnx is None:
        raise BackendUnavailable(f"the engine folder has no ONNX file for {name}; use --backend trt")
    # the files this session reads are hashed while ONNX Runtime loads them; the runner is
    # handed out (and its first output computed) only once every digest matched
    pending = manifest.verify_in_background(_onnx_files(manifest, spec, onnx))
    try:
        runner = OrtRunner(spec, onnx, device="cuda" if ort_cuda_available() else "cpu", threads=threads)
    except BaseException:
        pending.wait()  # a file that does not match its hash explains a failed load best
        raise
    try:
        pending.wait()
    except BaseException:
        runner.close()
        runner.session = None  # refused: ONNX Runtime frees the session with its last reference
        raise
    return runner


def _onnx_files(manifest: Manifest, spec: NetworkSpec, onnx: Path) -> list[str]:
    """The files a session over ``onnx`` reads: the graph and the network's external data
    (the flavours of a network share one weight file; the other flavour's graph is not
    opened, so it is not hashed here: ``apla-rt info --verify`` checks every file)."""
    return [manifest.rel(onnx)] + [manifest.rel(p) for p in spec.external_data]


# --------------------------------------------------------------------------- ONNX Runtime


class OrtRunner(_ConstantsMixin):
    """An ONNX Runtime session for one network (CPU, or CUDA with I/O binding)."""

    def __init__(self, spec: NetworkSpec, path: Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.spec = spec
        self._constants = {}
        self._device_constants: dict[str, object] = {}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # several sessions run one after another each step: idle pools must not spin on the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = " ".join(str(err).split())[:300]
            raise AplaError(f"onnxruntime {ort.__version__} cannot load {path.name} ({first}); "
                            "upgrade onnxruntime or re-export the run") from err
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.backend = f"onnxruntime-{self.device}"
        got_in = {i.name for i in self.session.get_inputs()}
        got_out = {o.name for o in self.session.get_outputs()}
        if got_in != set(spec.input_names) or not set(spec.output_names) <= got_out:
            raise IntegrityError(f"{path.name} has inputs {sorted(got_in)} and outputs "
                                 f"{sorted(got_out)}, but the manifest lists {list(spec.input_names)} "
                                 f"-> {list(spec.output_names)}; re-run the export")
        self._outputs = list(spec.output_names)

    def _constants_changed(self, name: str) -> None:
        self._device_constants.pop(name, None)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        merged = self._feeds(feeds)
        if self.device == "cpu":
            values = self.session.run(self._outputs, merged)
            return dict(zip(self._outputs, values))
        return self._run_cuda(merged, overridden=set(feeds))

    def _run_cuda(self, merged: dict[str, np.ndarray], overridden: set[str]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in merged.items():
            if name in self._constants and name not in overridden:
                device_value = self._device_constants.get(name)
                if device_value is None:  # uploaded once, reused by every later call
                    device_value = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                    self._device_constants[name] = device_value
                binding.bind_ortvalue_input(name, device_value)
            else:
                binding.bind_cpu_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self._device_constants.clear()


# --------------------------------------------------------------------------- TensorRT


class TrtRunner(_ConstantsMixin):
    """A TensorRT engine through Polygraphy (imported here, never at module import)."""

    backend = "tensorrt"

    def __init__(self, spec: NetworkSpec, path: Path, engine: bytes):
        """``engine``: the serialised engine read from ``path`` (verified by the caller)."""
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self.spec = spec
        self._constants = {}
        try:
            self._runner = PolygraphyTrtRunner(EngineFromBytes(engine), name=spec.name)
            self._runner.activate()
        except Exception as err:  # deserialisation fails for another TensorRT version or GPU
            raise BackendUnavailable(f"TensorRT cannot load {path.name} ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:200]}); engines are tied to the "
                                     "TensorRT version and GPU they were built with: rebuild them "
                                     "here or use --backend ort") from err

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._runner.infer(self._feeds(feeds))
        return {name: np.array(out[name], copy=True) for name in self.spec.output_names}

    def close(self) -> None:
        self._runner.deactivate()
