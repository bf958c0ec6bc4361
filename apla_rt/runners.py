"""One runner per network: ``run(feeds) -> outputs``, NumPy in and out.

* ``OrtRunner``: ONNX Runtime on the CPU provider (FP32 files), or on the CUDA provider
  (onnxruntime-gpu) with I/O binding: inputs given to ``set_constant`` (the text embeddings)
  are uploaded once and stay on the device for every later call, outputs are bound on the
  device and copied back once per call (the DDIM math is float64 NumPy, so the latent makes
  one round trip per step). On CUDA a network's FP16 file (``onnx_fp16``, written by
  ``apla-export --fp16``) is preferred; the runner casts the float32 feeds to the file's
  input dtypes and its outputs back to float32, so callers always see the contract's dtypes.
* ``TrtRunner`` (``apla_rt.trt_runner``): a TensorRT engine (``.plan``), imported only when
  such a runner is made.

Every runner checks its feeds against the manifest (names, dtypes, dims, profile ranges)
before running. ``select_backend`` implements ``--backend auto|ort-cpu|ort-cuda|trt`` (and
the older ``ort``: ONNX Runtime with the CUDA provider when it is usable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from .errors import AplaError, BackendUnavailable, IntegrityError
from .gpu import cuda_device_count, trt_available
from .manifest import Manifest, NetworkSpec

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt", "ort", "openvino")
# What ``select_backend`` chooses: "trt", "ort-cuda", "ort" (ONNX Runtime on the CPU) or
# "openvino" (OpenVINO's CPU plugin, apla_rt.openvino_runner).
BACKEND_HELP = ("auto: TensorRT when the folder has engines and TensorRT and a GPU are usable, "
                "else ONNX Runtime's CUDA provider when onnxruntime-gpu sees a GPU, else the CPU; "
                "ort-cpu / ort-cuda: ONNX Runtime on that provider; trt: TensorRT engines; "
                "ort: ONNX Runtime, CUDA when usable; openvino: OpenVINO's CPU plugin (fp32 or "
                "bf16, see --precision; the [openvino] extra).")


class Runner(Protocol):
    """What the pipeline needs from a network."""

    spec: NetworkSpec
    backend: str  # "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-cuda-fp16", "tensorrt",
    # "openvino-cpu" or "openvino-cpu-bf16"

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


def ort_cuda_status() -> tuple[bool, str]:
    """Whether ONNX Runtime's CUDA provider can run here; else False and a one-line reason."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "ONNX Runtime is not installed (pip install -e \".[gpu]\" for onnxruntime-gpu)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, (f"this onnxruntime {ort.__version__} has no CUDA provider (the CPU package "
                       "is installed; pip install -e \".[gpu]\" installs onnxruntime-gpu instead)")
    count, why = cuda_device_count()
    if count < 1:
        return False, "no CUDA GPU is visible" + (f" ({why})" if why else "")
    return True, ""


def ort_cuda_available() -> bool:
    """onnxruntime-gpu is installed and a CUDA GPU is visible."""
    return ort_cuda_status()[0]


def select_backend(requested: str, manifest: Manifest, networks: tuple[str, ...]) -> tuple[str, str]:
    """("trt" | "ort-cuda" | "ort", why) for ``--backend requested`` and the networks to be
    run; "ort" is ONNX Runtime on the CPU provider."""
    if requested not in BACKENDS:
        raise AplaError(f"unknown backend {requested!r}; use one of {', '.join(BACKENDS)}")
    specs = [manifest.network(n) for n in networks]
    if requested == "openvino":
        from .openvino_runner import openvino_status

        missing = [s.name for s in specs if s.onnx is None]
        if missing:
            raise BackendUnavailable(f"the engine folder has no portable ONNX file for "
                                     f"{', '.join(missing)}; re-export the run")
        ok, why = openvino_status()
        if not ok:
            raise BackendUnavailable(f"--backend openvino: {why}")
        return "openvino", "requested"
    no_engine = [s.name for s in specs if s.engine is None]
    no_onnx = [s.name for s in specs if s.onnx is None]
    if requested in ("ort", "ort-cpu", "ort-cuda") or (requested == "auto" and no_engine):
        if no_onnx:
            raise BackendUnavailable(f"the engine folder has no ONNX file for {', '.join(no_onnx)}; "
                                     "use --backend trt or re-export with ONNX files")
        if requested == "ort-cpu":
            return "ort", "requested"
        cuda, why = ort_cuda_status()
        if requested == "ort-cuda":
            if not cuda:
                raise BackendUnavailable(f"--backend ort-cuda: {why}; or use --backend ort-cpu")
            return "ort-cuda", "requested"
        reason = "requested" if requested == "ort" else f"no TensorRT engine for {', '.join(no_engine)}"
        return ("ort-cuda", reason) if cuda else ("ort", reason)
    if requested == "trt" and no_engine:
        raise BackendUnavailable(f"--backend trt: the engine folder has no TensorRT engine for "
                                 f"{', '.join(no_engine)}; build engines with apla-export on a "
                                 "machine with TensorRT, or use --backend ort-cuda / ort-cpu")
    ok, why = trt_available()
    if ok:
        return "trt", "requested" if requested == "trt" else "TensorRT engines and a GPU are available"
    if requested == "trt" or no_onnx:
        raise BackendUnavailable(f"--backend trt: {why}; or use --backend ort-cuda / ort-cpu")
    return ("ort-cuda" if ort_cuda_available() else "ort"), why


def open_runner(manifest: Manifest, name: str, backend: str, threads: int | None = None, *,
                precision: str = "fp32", streams: int = 1, notes: list[str] | None = None) -> Runner:
    """Verify the network's file against the manifest, then load it with ``backend``
    ("trt", "ort-cuda", "ort" or "openvino"). ``precision``, ``streams`` and ``notes`` are
    the OpenVINO runner's (``apla_rt.openvino_runner.open_ov_runner``); the others run as
    their files say."""
    spec = manifest.network(name)
    if backend == "openvino":
        from .openvino_runner import open_ov_runner

        return open_ov_runner(manifest, name, threads, precision, streams, notes)
    if backend == "trt":
        from .trt_runner import TrtRunner

        assert spec.engine is not None
        return TrtRunner(spec, spec.engine, manifest.read_verified(spec.engine))
    onnx = spec.onnx_ort or spec.onnx  # the fused-attention flavour where the export wrote one
    if onnx is None:
        raise BackendUnavailable(f"the engine folder has no ONNX file for {name}; use --backend trt")
    if backend == "ort-cuda" and spec.onnx_fp16 is not None:  # CPU paths stay FP32
        chosen, device, io_dtypes = spec.onnx_fp16, "cuda", spec.fp16_io
    else:
        chosen, device, io_dtypes = onnx, ("cuda" if backend == "ort-cuda" else "cpu"), None
    # the files this session reads are hashed while ONNX Runtime loads them; the runner is
    # handed out (and its first output computed) only once every digest matched
    pending = manifest.verify_in_background(_onnx_files(manifest, spec, chosen))
    try:
        runner = OrtRunner(spec, chosen, device=device, threads=threads, io_dtypes=io_dtypes)
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
    """The files a session over ``onnx`` reads: the graph, the network's listed external data
    and any data file named after the graph (``unet.fp16.onnx.data``). The other flavours'
    graphs are not opened, so they are not hashed here: ``apla-rt info --verify`` checks every
    file."""
    rel = manifest.rel(onnx)
    listed = [manifest.rel(p) for p in spec.external_data]
    named = [f for f in manifest.files if f.startswith(rel + ".") and f not in listed]
    return [rel] + listed + named


# --------------------------------------------------------------------------- ONNX Runtime


class OrtRunner(_ConstantsMixin):
    """An ONNX Runtime session for one network (CPU, or CUDA with I/O binding).

    ``io_dtypes``: the file's tensor dtypes where they differ from the manifest's contract
    (an FP16 file): feeds are cast to them after the contract's checks, outputs back to the
    contract's dtypes.
    """

    def __init__(self, spec: NetworkSpec, path: Path, device: str = "cpu", threads: int | None = None,
                 io_dtypes: Mapping[str, np.dtype] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("ONNX Runtime is not installed: pip install -e \".[cpu]\" (or "
                                     "\".[gpu]\" for onnxruntime-gpu's CUDA provider)") from None

        self.spec = spec
        contract = {t.name: t.dtype for t in spec.inputs + spec.outputs}
        self._io_dtypes = {k: np.dtype(v) for k, v in (io_dtypes or {}).items()
                           if k in contract and np.dtype(v) != contract[k]}
        self._out_dtypes = {t.name: t.dtype for t in spec.outputs if t.name in self._io_dtypes}
        self.precision = "fp16" if any(v == np.float16 for v in self._io_dtypes.values()) else "fp32"
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
        self.backend = f"onnxruntime-{self.device}" + ("-fp16" if self.precision == "fp16" else "")
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
        if self._io_dtypes:
            merged = {k: np.ascontiguousarray(v, dtype=self._io_dtypes.get(k, v.dtype)) for k, v in merged.items()}
        if self.device == "cpu":
            out = dict(zip(self._outputs, self.session.run(self._outputs, merged)))
        else:
            out = self._run_cuda(merged, overridden=set(feeds))
        for name, dtype in self._out_dtypes.items():
            out[name] = out[name].astype(dtype)
        return out

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
