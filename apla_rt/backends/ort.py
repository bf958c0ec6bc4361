"""What every runner shares (the ``Runner`` protocol, inputs pinned with ``set_constant``, the
files a session over an ONNX graph reads) and ``OrtRunner``, ONNX Runtime's runner; see
``apla_rt.backends.runners`` for how a backend is chosen and a runner opened."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from ..errors import AplaError, BackendUnavailable, IntegrityError
from ..folder.manifest import Manifest, NetworkSpec


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
