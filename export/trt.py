"""FP16 TensorRT engines from the exported ONNX, checked against ONNX Runtime FP32.

For each network of an engine folder's manifest (docs/architecture.md) this module

1. turns the manifest's named dims and ``profile`` ranges into min/opt/max input shapes
   (``profile_shapes``),
2. parses the ONNX with Polygraphy, pins normalisation and softmax layers (and the
   reduce/pow/sqrt chain of a decomposed LayerNorm) to FP32, and builds an FP16 engine with
   one optimisation profile, a timing cache shared by the folder, and precision constraints
   obeyed (``build_engine``),
3. runs the engine and ONNX Runtime FP32 on the same seeded random inputs at the opt and
   min shapes, with the fused-attention graph as the reference where the export wrote one
   (``export.trt_plan``), and compares them output by output (``compare_engine_with_onnxrt``);
   an engine outside the tolerance is dropped and marked failed, the ONNX folder is kept.

TensorRT and Polygraphy's TensorRT backend are imported inside functions: importing this
module never needs them. Every decision that does not need TensorRT (shapes, file names,
which layers stay FP32, the comparison inputs, the summary) is a pure function.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from apla_rt.backends.compare import CLIP_VOCAB_SIZE, InputsMeta, seeded_inputs
from apla_rt.folder.atomic import write_file
from apla_rt.errors import BackendUnavailable, ConfigError, IntegrityError
from apla_rt.backends.gpu import trt_available
from apla_rt.folder.files import sha256_file

from .fp16 import FP16_TOLERANCE as FP16_ONNX_TOLERANCE
from .trt_plan import SHAPE_SETS, Shapes, profile_shapes, validation_plan

if TYPE_CHECKING:
    import tensorrt as trt

ENGINE_SUFFIX = ".plan"
TIMING_CACHE_NAME = "timing.cache"  # one tactic timing cache per engine folder

# TensorRT layer types (trt.LayerType member names) always computed and stored in FP32.
DEFAULT_FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")
# A LayerNorm exported op by op (opset < 17): x - mean, ^2, mean, + eps, sqrt, /. The square,
# its mean and the root overflow or lose the variance in FP16; they are pinned wherever they
# appear, and every arithmetic layer inside a "norm" scope is pinned with them.
DECOMPOSED_NORM_OPS = ("ReduceMean", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt", "Reciprocal")
_ARITHMETIC_LAYER_TYPES = ("REDUCE", "ELEMENTWISE", "UNARY")
_NORM_SCOPE = re.compile(r"norm|^ln(_|\d|$)", re.IGNORECASE)

# Comparison tolerances (elementwise: an element fails only beyond both atol and rtol).
# FP16: the SD-scale tolerance of ONNX Runtime's FP16 UNet against FP32
# (export.fp16.FP16_TOLERANCE["sd"], docs/export.md "FP16"): an engine is held to what FP16
# storage costs there (measured on the SD-1.5-shaped model; TensorRT's own FP16 arithmetic is not).
FP16_TOLERANCE = (FP16_ONNX_TOLERANCE["sd"]["max_abs"], FP16_ONNX_TOLERANCE["sd"]["max_abs"])
FP32_TOLERANCE = (1e-3, 1e-3)


Log = Callable[[str], None]


# --------------------------------------------------------------------------- availability


def require_trt() -> None:
    """Raise ``BackendUnavailable`` with the reason when TensorRT cannot run here."""
    ok, why = trt_available()
    if not ok:
        raise BackendUnavailable(f"cannot build TensorRT engines: {why}")


# --------------------------------------------------------------------------- names and shapes


def engine_filename(network_name: str) -> str:
    """The plan file of a network inside the engine folder, e.g. ``unet.plan``."""
    if not network_name or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", network_name):
        raise ConfigError(f"network name {network_name!r} cannot name an engine file; "
                          "use letters, digits, '_', '-' and '.'")
    return network_name + ENGINE_SUFFIX


def timing_cache_path(engine_dir: str | os.PathLike) -> Path:
    """The tactic timing cache shared by every engine of a folder."""
    return Path(engine_dir) / TIMING_CACHE_NAME


def check_network_inputs(network_inputs: Mapping[str, Sequence[int]], shapes: Shapes) -> None:
    """Check that ``shapes`` covers the parsed network's inputs (-1 marks a dynamic dim)."""
    missing = sorted(set(network_inputs) - set(shapes))
    extra = sorted(set(shapes) - set(network_inputs))
    if missing or extra:
        raise ConfigError(f"the profile's inputs {sorted(shapes)} do not match the ONNX inputs "
                          f"{sorted(network_inputs)} (missing {missing}, unknown {extra})")
    for name, dims in network_inputs.items():
        for which, shape in zip(SHAPE_SETS, shapes[name]):
            if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                raise ConfigError(f"input {name!r}: {which} shape {list(shape)} does not fit "
                                  f"the ONNX shape {list(dims)} (-1 = dynamic)")


# --------------------------------------------------------------------------- FP32 layers


def _type_key(layer_type: str) -> str:
    """``"LayerType.SOFTMAX"``, ``"softmax"``, ``"SoftMax"`` -> ``"SOFTMAX"``."""
    return layer_type.rsplit(".", 1)[-1].upper()


def onnx_op_of_layer(layer_name: str) -> str:
    """The ONNX op a TensorRT layer came from, read off the parser's name.

    The ONNX parser names layers after their node, e.g. ``/text_model/.../ReduceMean_1``;
    the op is the leading letters of the last path component.
    """
    last = layer_name.rsplit("/", 1)[-1]
    match = re.match(r"[A-Za-z]+", last)
    return match.group(0) if match else ""


def _in_norm_scope(layer_name: str) -> bool:
    scopes = [part for part in layer_name.split("/")[:-1] if part]
    return any(_NORM_SCOPE.search(part) for part in scopes)


def keep_in_fp32(layer_type: str, layer_name: str,
                 fp32_layer_types: Sequence[str] = DEFAULT_FP32_LAYER_TYPES) -> bool:
    """Whether a layer (TensorRT layer type name, layer name) must run in FP32."""
    kind = _type_key(layer_type)
    if kind in {_type_key(t) for t in fp32_layer_types}:
        return True
    if kind not in _ARITHMETIC_LAYER_TYPES:
        return False
    return onnx_op_of_layer(layer_name) in DECOMPOSED_NORM_OPS or _in_norm_scope(layer_name)


def select_fp32_layers(layers: Iterable[tuple[str, str]],
                       fp32_layer_types: Sequence[str] = DEFAULT_FP32_LAYER_TYPES) -> list[int]:
    """Indices of the layers, given as (layer type name, layer name), to pin to FP32."""
    return [i for i, (kind, name) in enumerate(layers) if keep_in_fp32(kind, name, fp32_layer_types)]


def _pin_fp32_layers(network: trt.INetworkDefinition, fp32_layer_types: Sequence[str]) -> int:
    """Set the selected float layers' precision and output types to FP32; returns how many."""
    import tensorrt as trt

    floats = {trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    pinned = 0
    for i in select_fp32_layers([(layer.type.name, layer.name) for layer in layers], fp32_layer_types):
        layer = layers[i]
        tensors = [layer.get_output(j) for j in range(layer.num_outputs)]
        tensors += [layer.get_input(j) for j in range(layer.num_inputs)]
        # Shape arithmetic (int64) and comparisons (bool) keep their types.
        if not all(t is None or t.dtype in floats for t in tensors):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _network_inputs(network: trt.INetworkDefinition) -> dict[str, tuple[int, ...]]:
    inputs = (network.get_input(i) for i in range(network.num_inputs))
    return {t.name: tuple(int(t.shape[k]) for k in range(len(t.shape))) for t in inputs}


# --------------------------------------------------------------------------- building


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    shapes: Shapes,
    fp16: bool = True,
    timing_cache: Optional[str | os.PathLike] = None,
    fp32_layer_types: Sequence[str] = DEFAULT_FP32_LAYER_TYPES,
    workspace_bytes: Optional[int] = None,
    log: Optional[Log] = None,
) -> None:
    """Build a TensorRT engine from ``onnx_path`` and write it atomically to ``plan_path``.

    One optimisation profile from ``shapes`` (input -> (min, opt, max)). With ``fp16`` the
    layers chosen by ``select_fp32_layers`` are pinned to FP32 and the builder obeys the
    precision constraints. ``timing_cache`` is read when it exists and updated after the
    build. Raises ``BackendUnavailable`` without TensorRT or a GPU, ``ConfigError`` when the
    shapes do not fit the ONNX inputs.
    """
    require_trt()
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath,
                                        PostprocessNetwork, Profile, SaveEngine)

    unknown = [t for t in fp32_layer_types if _type_key(t) not in trt.LayerType.__members__]
    if unknown:
        raise ConfigError(f"unknown TensorRT layer types {unknown}; "
                          f"use trt.LayerType names such as {list(DEFAULT_FP32_LAYER_TYPES)}")
    say = log or (lambda _msg: None)

    def prepare(network: trt.INetworkDefinition) -> None:
        check_network_inputs(_network_inputs(network), shapes)
        if fp16:
            pinned = _pin_fp32_layers(network, fp32_layer_types)
            say(f"{Path(onnx_path).name}: {pinned} of {network.num_layers} layers pinned to FP32")

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)

    cache = Path(timing_cache) if timing_cache is not None else None
    pools = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)} if workspace_bytes else None
    config = CreateConfig(
        fp16=fp16,
        profiles=[profile],
        precision_constraints="obey" if fp16 else None,
        load_timing_cache=str(cache) if cache is not None and cache.is_file() else None,
        memory_pool_limits=pools,
    )
    network = PostprocessNetwork(NetworkFromOnnxPath(str(onnx_path)), func=prepare,
                                 name="apla-fp32-layers")
    engine = EngineFromNetwork(network, config=config,
                               save_timing_cache=str(cache) if cache is not None else None)
    write_file(plan_path, lambda tmp: SaveEngine(engine, path=str(tmp))(), force=True)


# --------------------------------------------------------------------------- comparison


def comparison_inputs(input_dtypes: Mapping[str, Any], shapes: Shapes, which: str = "opt") -> InputsMeta:
    """Input name -> (dtype, shape) at the ``which`` ("min", "opt", "max") profile shape."""
    if which not in SHAPE_SETS:
        raise ConfigError(f"shape set {which!r} is not one of {list(SHAPE_SETS)}")
    missing = sorted(set(input_dtypes) - set(shapes))
    if missing:
        raise ConfigError(f"no profile shapes for the ONNX inputs {missing}")
    index = SHAPE_SETS.index(which)
    return {name: (np.dtype(dtype), tuple(shapes[name][index])) for name, dtype in input_dtypes.items()}


def vocab_size_of(model: Any, input_name: str = "input_ids") -> Optional[int]:
    """Rows of the embedding table that ``input_name`` indexes (through Cast/Identity), if any."""
    tables = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 2}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            tensor = node.attribute[0].t
            if len(tensor.dims) == 2:
                tables[node.output[0]] = int(tensor.dims[0])
    names = {input_name}
    for node in model.graph.node:  # nodes are topologically sorted
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in names:
            names.add(node.output[0])
        if (node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in names
                and node.input[0] in tables):
            return tables[node.input[0]]
    return None


def onnx_input_spec(onnx_path: str | os.PathLike) -> tuple[dict[str, np.dtype], Optional[int]]:
    """The ONNX graph inputs' NumPy dtypes and, if it has ``input_ids``, its vocabulary size."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    dtypes = {
        i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        for i in model.graph.input if i.name not in initializers
    }
    vocab = vocab_size_of(model) if "input_ids" in dtypes else None
    return dtypes, vocab


def compare_runners(runners: Sequence[Any], feeds: Sequence[tuple[str, Mapping[str, np.ndarray]]],
                    atol: float, rtol: float) -> dict:
    """Run Polygraphy runners on labelled feeds and compare each runner with the next.

    Returns a JSON-able summary: ``passed``, the tolerances, the input shapes per label, and per
    output its largest max-abs and mean-abs error over the labels (also given per label).
    """
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    labels = [label for label, _ in feeds]
    run_results = Comparator.run(list(runners), data_loader=[dict(feed) for _, feed in feeds])
    compare = SimpleCompareFunc(atol=atol, rtol=rtol)
    results = Comparator.compare_accuracy(run_results, compare_func=compare)
    accuracy = [results] if hasattr(results, "items") else list(results)  # Polygraphy < 0.53: one

    per_label: dict[str, dict[str, Any]] = {label: {"passed": True, "outputs": {}} for label in labels}
    outputs: dict[str, dict[str, Any]] = {}
    for acc in accuracy:
        for _pair, iterations in acc.items():
            for label, per_output in zip(labels, iterations):
                for name, res in per_output.items():
                    ok = bool(res)
                    max_abs = getattr(res, "max_absdiff", None)
                    mean_abs = getattr(res, "mean_absdiff", None)
                    per_label[label]["outputs"][name] = {"max_abs": max_abs, "mean_abs": mean_abs, "passed": ok}
                    per_label[label]["passed"] &= ok
                    total = outputs.setdefault(name, {"max_abs": 0.0, "mean_abs": 0.0, "passed": True})
                    total["passed"] &= ok
                    for key, value in (("max_abs", max_abs), ("mean_abs", mean_abs)):
                        total[key] = None if value is None or total[key] is None else max(total[key], value)
    return {
        "passed": bool(results) and all(v["passed"] for v in per_label.values()),
        "atol": float(atol),
        "rtol": float(rtol),
        "runners": [getattr(r, "name", type(r).__name__) for r in runners],
        "shapes": {label: {k: list(v.shape) for k, v in feed.items()} for label, feed in feeds},
        "outputs": outputs,
        "per_shape": per_label,
    }


def compare_engine_with_onnxrt(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    shapes: Shapes,
    atol: float,
    rtol: float,
    seed: int = 0,
    which: Sequence[str] = ("opt", "min"),
    vocab_size: Optional[int] = None,
    providers: Optional[Sequence[str]] = None,
) -> dict:
    """Compare the engine with ONNX Runtime FP32 running ``onnx_path`` (the reference: the
    fused-attention flavour where there is one, see ``export.trt_plan``) at the ``which``
    profile shapes, on ``providers`` (default: CUDA where onnxruntime-gpu sees a GPU, else CPU).

    Inputs are seeded per shape set (``seed + i``, ``apla_rt.backends.compare.seeded_inputs``);
    ``input_ids`` are drawn below the ONNX's own embedding size unless ``vocab_size`` is given.
    Returns ``compare_runners``' summary.
    """
    require_trt()
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    dtypes, onnx_vocab = onnx_input_spec(onnx_path)
    vocab = vocab_size or onnx_vocab or CLIP_VOCAB_SIZE
    feeds = [(w, seeded_inputs(comparison_inputs(dtypes, shapes, w), seed + i, vocab_size=vocab))
             for i, w in enumerate(which)]
    runners = [
        TrtRunner(EngineFromPath(str(plan_path)), name="tensorrt"),
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=list(providers or reference_providers())),
                     name="onnxruntime-fp32"),
    ]
    return compare_runners(runners, feeds, atol, rtol)


def reference_providers() -> list[str]:
    """ONNX Runtime providers for the FP32 reference: CUDA first where it is usable."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- the folder


def engine_tolerance(fp16: bool) -> tuple[float, float]:
    """(atol, rtol) an engine must meet against ONNX Runtime FP32."""
    return FP16_TOLERANCE if fp16 else FP32_TOLERANCE


def build_all(
    engine_dir: str | os.PathLike,
    manifest: dict,
    fp16: bool,
    log: Log,
    tolerance: Optional[tuple[float, float]] = None,
    strict: bool = True,
) -> dict:
    """Build and check an engine for every manifest network that has an ONNX file.

    Each engine is compared as ``export.trt_plan.validation_plan`` says (the profile's min
    and opt shapes, the fused-attention graph as the reference where there is one). Returns
    a copy of ``manifest`` with ``engine`` (e.g. ``"unet.plan"``) and ``trt_check`` (the
    comparison summary) set per network, the plans' hashes in ``files`` and TensorRT's
    version in ``versions``; the caller writes it. An engine outside ``tolerance`` (default
    ``engine_tolerance(fp16)``) raises ``IntegrityError`` with ``strict``; without, its plan
    is deleted, the network keeps ``engine: null`` with ``trt_status: "failed"`` and the
    failed check, one line says so, and the other networks go on.
    """
    require_trt()
    import tensorrt as trt


    engine_dir = Path(engine_dir)
    out = copy.deepcopy(manifest)
    networks = out.get("networks")
    if not isinstance(networks, dict) or not networks:
        raise IntegrityError(f"{engine_dir}/manifest.json lists no networks; re-run the export")
    atol, rtol = tolerance or engine_tolerance(fp16)
    cache = timing_cache_path(engine_dir)
    for name, entry in networks.items():
        if not entry.get("onnx"):
            log(f"{name}: no ONNX file, no engine")
            continue
        onnx_path = engine_dir / entry["onnx"]
        if not onnx_path.is_file():
            raise IntegrityError(f"{onnx_path} is listed in the manifest but missing; re-run the export")
        shapes = profile_shapes(entry.get("inputs", []), entry.get("profile", {}))
        try:
            check_plan = validation_plan(name, entry)
        except ValueError as err:
            raise IntegrityError(str(err)) from err
        plan = engine_filename(name)
        log(f"{name}: building {'FP16' if fp16 else 'FP32'} engine {plan} for "
            + ", ".join(f"{k} {list(v[0])}..{list(v[2])}" for k, v in shapes.items()))
        build_engine(onnx_path, engine_dir / plan, shapes, fp16=fp16, timing_cache=cache, log=log)
        reference = engine_dir / check_plan["reference"]
        summary = compare_engine_with_onnxrt(reference, engine_dir / plan, shapes, atol, rtol,
                                             which=[c["which"] for c in check_plan["checks"]])
        summary["reference"] = check_plan["reference"]
        worst = ", ".join(f"{k} max {v['max_abs']:.3g} mean {v['mean_abs']:.3g}"
                          for k, v in summary["outputs"].items()
                          if v["max_abs"] is not None and v["mean_abs"] is not None)
        where = f"{check_plan['reference']} at the {' and '.join(c['which'] for c in check_plan['checks'])} shapes"
        if not summary["passed"]:
            if strict:
                raise IntegrityError(f"the {name} engine differs from ONNX Runtime FP32 beyond "
                                     f"atol={atol:g}, rtol={rtol:g} ({worst}); check the export, or "
                                     "build without FP16")
            (engine_dir / plan).unlink()
            entry["engine"] = None
            entry["trt_status"] = "failed"
            entry["trt_check"] = summary
            log(f"{name}: TensorRT engine FAILED its check against {where} (atol={atol:g}, "
                f"rtol={rtol:g}; {worst}): not kept, {name} runs on ONNX Runtime")
            continue
        log(f"{name}: matches ONNX Runtime FP32 ({where}; atol={atol:g}, rtol={rtol:g}; {worst})")
        entry["engine"] = plan
        entry["trt_status"] = "ok"
        entry["trt_check"] = summary
        out.setdefault("files", {})[plan] = sha256_file(engine_dir / plan)
    out.setdefault("versions", {})["tensorrt"] = trt.__version__
    return out
