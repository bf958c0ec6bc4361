"""One runner per network: ``run(feeds) -> outputs``, NumPy in and out.

* ``OrtRunner``: ONNX Runtime on the CPU provider (FP32 files), or on the CUDA provider
  (onnxruntime-gpu) with I/O binding: inputs given to ``set_constant`` (the text embeddings)
  are uploaded once and stay on the device for every later call, outputs are bound on the
  device and copied back once per call (the DDIM math is float64 NumPy, so the latent makes
  one round trip per step). On CUDA a network's FP16 file (``onnx_fp16``, written by
  ``apla-export --fp16``) is preferred; the runner casts the float32 feeds to the file's
  input dtypes and its outputs back to float32, so callers always see the contract's dtypes.
* ``TrtRunner`` (``apla_rt.backends.trt``): a TensorRT engine (``.plan``), imported only when
  such a runner is made; ``OvRunner`` (``apla_rt.backends.openvino``) likewise.

``OrtRunner``, the ``Runner`` protocol and what every runner shares live in
``apla_rt.backends.ort``, below this module and below the other runners: this module chooses
and opens them.

Every runner checks its feeds against the manifest (names, dtypes, dims, profile ranges)
before running. ``select_backend`` implements ``--backend auto|ort-cpu|ort-cuda|trt`` (and
the older ``ort``: ONNX Runtime with the CUDA provider when it is usable).
"""

from __future__ import annotations

__all__ = ["BACKENDS", "OrtRunner", "Runner", "open_runner", "ort_cuda_available", "ort_cuda_status",
           "select_backend"]

from ..errors import AplaError, BackendUnavailable
from .gpu import cuda_device_count, trt_available
from ..folder.manifest import Manifest
from .ort import OrtRunner, Runner, _onnx_files

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt", "ort", "openvino")
# What ``select_backend`` chooses: "trt", "ort-cuda", "ort" (ONNX Runtime on the CPU) or
# "openvino" (OpenVINO's CPU plugin, apla_rt.backends.openvino).
BACKEND_HELP = ("auto: TensorRT when the folder has engines and TensorRT and a GPU are usable, "
                "else ONNX Runtime's CUDA provider when onnxruntime-gpu sees a GPU, else the CPU (ONNX "
                "Runtime; OpenVINO in bf16 on an AMX CPU for a UNet of 100 MB or more with "
                "--precision auto); "
                "ort-cpu / ort-cuda: ONNX Runtime on that provider; trt: TensorRT engines; "
                "ort: ONNX Runtime, CUDA when usable; openvino: OpenVINO's CPU plugin (fp32 or "
                "bf16, see --precision; the [openvino] extra).")


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
        from .openvino import openvino_status

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


def auto_cpu_backend(manifest: Manifest, networks: tuple[str, ...]) -> tuple[str, str] | None:
    """("openvino", why) where ``--backend auto --precision auto`` would otherwise run ONNX
    Runtime on the CPU but this CPU's AMX runs the folder's UNet faster in bf16
    (``cpu_precision.auto_openvino_reason``); None where it stays on ONNX Runtime."""
    from . import precision as cpu_precision

    specs = [manifest.network(n) for n in networks]
    if "unet" not in networks or any(s.onnx is None for s in specs):
        return None
    unet = manifest.network("unet")
    assert unet.onnx is not None
    unet_mb = sum((manifest.root / rel).stat().st_size
                  for rel in _onnx_files(manifest, unet, unet.onnx) if (manifest.root / rel).exists()) / 2**20
    cpu = cpu_precision.probe_cpu()
    if not cpu_precision.auto_openvino_may_pay(cpu, unet_mb):  # OpenVINO is not even imported
        return None
    from .openvino import openvino_status, ov_capabilities

    if not openvino_status()[0]:
        return None
    why = cpu_precision.auto_openvino_reason(cpu, ov_capabilities(), unet_mb)
    return ("openvino", why) if why else None


def open_runner(manifest: Manifest, name: str, backend: str, threads: int | None = None, *,
                precision: str = "fp32", streams: int = 1, notes: list[str] | None = None) -> Runner:
    """Verify the network's file against the manifest, then load it with ``backend``
    ("trt", "ort-cuda", "ort" or "openvino"). ``precision``, ``streams`` and ``notes`` are
    the OpenVINO runner's (``apla_rt.backends.openvino.open_ov_runner``); the others run as
    their files say."""
    spec = manifest.network(name)
    if backend == "openvino":
        from .openvino import open_ov_runner

        return open_ov_runner(manifest, name, threads, precision, streams, notes)
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
