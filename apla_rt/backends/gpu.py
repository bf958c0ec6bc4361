"""Is a CUDA GPU / TensorRT / ONNX Runtime's CUDA provider usable here? Checked without torch
and without cudart.

The one place that answers it: the runtime (``apla_rt.backends.placement``) and the exporter
(``export.trt``) both ask these functions.
"""

from __future__ import annotations

import ctypes

INSTALL_HINT = "pip install tensorrt, or the wheel for your CUDA such as tensorrt-cu12"


def cuda_device_count() -> tuple[int, str]:
    """Count CUDA devices through the driver API (libcuda), without torch or cudart."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0, "the NVIDIA driver library (libcuda) is not found"
    try:
        status = lib.cuInit(0)
        if status != 0:
            return 0, f"cuInit failed with CUDA driver error {status}"
        count = ctypes.c_int(0)
        status = lib.cuDeviceGetCount(ctypes.byref(count))
        if status != 0:
            return 0, f"cuDeviceGetCount failed with CUDA driver error {status}"
    except (AttributeError, OSError) as err:
        return 0, f"the NVIDIA driver library cannot be used: {err}"
    return int(count.value), ""


def cudart_loadable() -> str:
    """Empty when Polygraphy can load the CUDA runtime its TrtRunner uses, else why not."""
    try:
        from polygraphy import cuda

        cuda.wrapper()
    except Exception as err:  # Polygraphy raises its own exception type; OSError from ctypes
        return (f"the CUDA runtime library (libcudart) cannot be loaded ({type(err).__name__}); "
                "pip install nvidia-cuda-runtime-cu12")
    return ""


def trt_available() -> tuple[bool, str]:
    """Whether TensorRT imports and a CUDA GPU is visible; else False and a one-line reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, f"TensorRT is not installed ({INSTALL_HINT})"
    except Exception as err:  # a broken install: missing shared libraries, wrong CUDA
        message = " ".join(str(err).split())
        return False, f"TensorRT is installed but does not load ({type(err).__name__}: {message})"
    count, why = cuda_device_count()
    if count < 1:
        return False, "no CUDA GPU is visible" + (f" ({why})" if why else "")
    why = cudart_loadable()
    if why:
        return False, why
    return True, ""


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
