"""Opening one network's runner for a concrete choice (``apla_rt.backends.placement.Choice``):
``run(feeds) -> outputs``, NumPy in and out.

* ``OrtRunner`` (``apla_rt.backends.ort``): ONNX Runtime on the CPU provider (FP32 files), or on
  the CUDA provider (onnxruntime-gpu) with I/O binding: inputs given to ``set_constant`` (the
  text embeddings) are uploaded once and stay on the device for every later call, outputs are
  bound on the device and copied back once per call. On CUDA a network's FP16 file
  (``onnx_fp16``, written by ``apla-export --fp16``) is preferred; the runner casts the float32
  feeds to the file's input dtypes and its outputs back to float32, so callers always see the
  contract's dtypes.
* ``TrtRunner`` (``apla_rt.backends.trt``): a TensorRT engine (``.plan``), imported only when
  such a runner is made; ``OvRunner`` (``apla_rt.backends.openvino``) likewise.

Every runner checks its feeds against the manifest (names, dtypes, dims, profile ranges)
before running, and every file is checked against its sha256 before its runner is handed out.
"""

from __future__ import annotations

__all__ = ["OrtRunner", "Runner", "open_runner"]

from ..errors import BackendUnavailable
from ..folder.manifest import Manifest
from .ort import OrtRunner, Runner, _onnx_files


def open_runner(manifest: Manifest, name: str, backend: str, threads: int | None = None, *,
                precision: str = "fp32", streams: int = 1) -> Runner:
    """Verify the network's file against the manifest, then load it with ``backend``
    ("trt", "ort-cuda", "ort" or "openvino"). ``precision`` ("fp32", "bf16" or "int8") and ``streams``
    are the OpenVINO runner's (``apla_rt.backends.openvino.open_ov_runner``); the others run
    as their files say."""
    spec = manifest.network(name)
    if backend == "openvino":
        from .openvino import open_ov_runner

        return open_ov_runner(manifest, name, threads, precision, streams)
    if backend == "trt":
        from .trt import TrtRunner

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
