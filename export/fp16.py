"""FP16 ONNX for ONNX Runtime's CUDA provider, and its check against the FP32 file.

``apla-export --fp16`` converts the UNet's ONNX Runtime flavour (fused attention,
``unet.ort.onnx``) to ``unet.fp16.onnx`` with ONNX Runtime's own float16 converter
(``onnxruntime.transformers.float16``):

* weights, activations and the graph's float inputs/outputs become float16; the integer
  ``timestep`` stays int64. The manifest records the file's input/output dtypes
  (``onnx_fp16_io``) and the runtime casts at the boundaries (float32 in and out, as for
  every other network);
* the ops whose FP16 arithmetic loses the result stay float32, with Casts inserted around
  them (``FP32_OPS``): the normalisations (GroupNorm is exported as InstanceNormalization,
  LayerNorm as LayerNormalization, or op by op below opset 17), softmax, and the sinusoidal
  timestep embedding (``sin``/``cos`` of ``t * freq`` with t up to 999: FP16 spaces
  numbers 0.5 apart there);
* ONNX Runtime's fused ``MultiHeadAttention`` stays FP16: its CUDA kernels accumulate the
  scores and the softmax in FP32.

``compare`` runs both files in ONNX Runtime on the same seeded inputs and reports the
error of FP16 against FP32 (the metrics of ``apla_rt.backends.compare``). On a CPU this is a
numerics check only: the CPU provider has few FP16 kernels and ONNX Runtime runs the others in
FP32 between inserted Casts, so FP16 *storage* (weights and activations rounded to 11
significant bits) is what is measured; the CUDA provider's FP16 GEMMs are not. Speed is a GPU matter (``benchmarks/gpu_check.py``).

The tolerances below were measured (docs/export.md, "FP16"), not guessed:
``benchmarks/fp16_tolerance.py`` on the tiny model and on the SD-1.5-shaped random model.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from apla_rt.backends.compare import error_stats, within, worst

FP16_SUFFIX = ".fp16.onnx"
# Networks written in FP16 for the CUDA provider (the UNet is >95 % of the sampling time).
FP16_NETWORKS = ("unet",)
# ONNX ops kept in float32 (Casts are inserted around them), on top of ONNX Runtime's own
# default list (ops without float16 kernels).
FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax",
            "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos")
# Nodes kept in float32 by name: the sinusoidal timestep projection (diffusers' ``time_proj``).
FP32_NODE_SCOPES = re.compile(r"(^|/)time_proj(/|$)")

# FP16 vs FP32 (ONNX Runtime, same inputs) on noise_pred, whose values are O(1):
# max abs error per output element, and ``rel_rms`` (apla_rt.backends.compare: the RMS error
# over max(the reference's RMS, 1)).
# ~3x the worst of the measured seeds (docs/export.md "FP16").
FP16_TOLERANCE = {
    "tiny": {"max_abs": 2e-2, "rel_rms": 1e-2},
    # rel RMS: 3.5x the measured 1.43e-3; max abs: the measured 4.0e-4 was on outputs of
    # |max| 0.27 (a random model), scaled to unit-size noise predictions (x4) with a 3x margin
    "sd": {"max_abs": 5e-3, "rel_rms": 5e-3},
}


def fp16_path(onnx_path: Path) -> Path:
    """``unet.ort.onnx`` / ``unet.onnx`` -> ``unet.fp16.onnx``."""
    name = onnx_path.name
    for suffix in (".ort.onnx", ".onnx"):
        if name.endswith(suffix):
            return onnx_path.with_name(name[: -len(suffix)] + FP16_SUFFIX)
    raise ValueError(f"{onnx_path} is not an .onnx file")


def fp16_tolerance(image_size: int, scale: str | None = None) -> dict[str, float]:
    """The FP16 tolerance for a network trained at ``image_size`` pixels (SD scale: >= 256),
    or for ``scale`` ("tiny" | "sd") when given."""
    return dict(FP16_TOLERANCE[scale or ("sd" if image_size >= 256 else "tiny")])


def fp32_node_names(node_names: Iterable[str]) -> list[str]:
    """The nodes (by name) to keep in float32 besides ``FP32_OPS``."""
    return [n for n in node_names if FP32_NODE_SCOPES.search(n)]


def convert_model(model: Any) -> Any:
    """An FP16 copy of an ``onnx.ModelProto`` (see the module docstring for what stays FP32)."""
    from onnxruntime.transformers import float16

    blocked_ops = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    blocked_nodes = fp32_node_names(n.name for n in model.graph.node)
    _infer_types(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model has values out of FP16 range": clamped
        converted = float16.convert_float_to_float16(
            model, keep_io_types=False, op_block_list=blocked_ops, node_block_list=blocked_nodes,
            disable_shape_infer=True)
    return _toposort(converted)


def _infer_types(model: Any) -> None:
    """Fill ``value_info`` with every tensor's type, also for models over 2 GB.

    The converter inserts the Casts around an FP32 node only for inputs whose type it finds in
    ``value_info``; the export's clean-up cannot run shape inference on a model over 2 GB
    (protobuf's limit), and without it the SD-1.5-shaped UNet's GroupNorms got FP16 data with
    no Cast. Inference runs on a copy without the large weights' bytes (their dims and types
    are what it reads), then the weights are put back."""
    import onnx

    stash = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > 1 << 16:
            stash[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for tensor in model.graph.initializer:
            if tensor.name in stash:
                tensor.raw_data = stash[tensor.name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def _toposort(model: Any) -> Any:
    """The converter appends its Casts at the end of the node list: sort the graph again."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.toposort()
    out = gs.export_onnx(graph)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.ir_version = model.ir_version
    return out


def convert_file(src: Path, dst: Path) -> list[Path]:
    """Write the FP16 copy of ``src`` to ``dst`` (checked with ``onnx.checker``); returns the
    files written (the .onnx and, over 2 GB, its .data file)."""
    import onnx

    from .onnx_export import save_onnx

    model = onnx.load(str(src), load_external_data=True)
    return save_onnx(convert_model(model), dst)


def io_dtypes(onnx_path: Path) -> dict[str, dict[str, str]]:
    """{"inputs"|"outputs": {name: numpy dtype name}} of an ONNX file's graph."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)

    def dtype(vi) -> str:
        return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name

    return {"inputs": {vi.name: dtype(vi) for vi in model.graph.input},
            "outputs": {vi.name: dtype(vi) for vi in model.graph.output}}


def cast_feeds(feeds: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Feeds converted to a file's input dtypes (float32 -> float16; ints unchanged)."""
    return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in feeds.items()}


def compare(fp32_path: Path, fp16_file: Path, feeds_list: list[dict[str, np.ndarray]],
            tolerance: Mapping[str, float], threads: int | None = None,
            providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """FP16 file vs FP32 file in ONNX Runtime on every feed set (float32 feeds; the FP16
    file's are cast): per-check error statistics, the worst of each, and pass/fail."""
    from .validate import ort_session

    fp32 = ort_session(fp32_path, threads)
    fp16 = ort_session(fp16_file, threads, providers=providers)
    dtypes = {i.name: _np_type(i.type) for i in fp16.get_inputs()}
    outputs = [o.name for o in fp32.get_outputs()]
    checks = []
    for feeds in feeds_list:
        refs = fp32.run(outputs, feeds)
        gots = fp16.run(outputs, cast_feeds(feeds, dtypes))
        for name, ref, got in zip(outputs, refs, gots):
            stats = error_stats(ref, got.astype(np.float32))
            checks.append({"output": name, "shape": list(ref.shape), **stats,
                           "passed": within(stats, tolerance)})
    return {"tolerance": dict(tolerance), "providers": list(fp16.get_providers()),
            "checks": checks, "worst": worst(checks), "passed": all(c["passed"] for c in checks)}


def _np_type(ort_type: str) -> str:
    """ONNX Runtime's "tensor(float16)" -> "float16"."""
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") else ort_type
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def export_fp16(spec: Any, folder: Path, entry: Mapping[str, Any], image_size: int,
                threads: int | None, log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write and check the FP16 copy of a network's ONNX Runtime file inside ``folder``.

    Returns (manifest entry updates, validation report). The FP16 file is compared with the
    FP32 one at the network's smallest validation shape (fewest frames, batch 1), on the CUDA
    provider where onnxruntime-gpu sees a GPU, else on the CPU. A miss
    deletes the FP16 file, records ``onnx_fp16: null`` and the failed check, and says so in
    one line: the FP32 networks stay valid and the folder is kept.
    """
    src = folder / (entry.get("onnx_ort") or entry["onnx"])
    dst = fp16_path(folder / entry["onnx"])
    files = convert_file(src, dst)
    smallest = min(spec.validate_at, key=lambda z: z.get("frames", 1) * z.get("batch", 1))
    sizes = {**smallest, "batch": 1}
    feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, spec.example(sizes, seed=200))}
    providers = ("CPUExecutionProvider",)
    if _ort_cuda():
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    result = compare(src, dst, [feeds], fp16_tolerance(image_size), threads, providers)
    result["shape"] = sizes
    w, tol = result["worst"], result["tolerance"]
    where = "CUDA" if result["providers"][0] == "CUDAExecutionProvider" else "CPU"
    if not result["passed"]:
        for f in files:
            f.unlink()
        log(f"{spec.name}.fp16: FP16 vs FP32 max abs {w['max_abs']:.2e}, rel RMS {w['rel_rms']:.2e} "
            f"over the tolerance {tol} ({where}); no FP16 file, ONNX Runtime uses FP32 for {spec.name}")
        return {"onnx_fp16": None, "fp16_check": _summary(result)}, result
    log(f"{spec.name}.fp16    written; FP16 vs FP32 max abs {w['max_abs']:.2e}, rel RMS "
        f"{w['rel_rms']:.2e} (tolerance {tol['max_abs']:.0e} / {tol['rel_rms']:.0e}, {where}): ok")
    return {"onnx_fp16": dst.name, "onnx_fp16_io": io_dtypes(dst),
            "external_data": list(entry.get("external_data", [])) + [f.name for f in files[1:]],
            "fp16_check": _summary(result)}, result


def _summary(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("passed", "worst", "tolerance", "providers", "shape")}


def _ort_cuda() -> bool:
    import onnxruntime as ort

    from apla_rt.backends.gpu import cuda_device_count

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count()[0] > 0
