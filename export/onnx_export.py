"""ONNX export of one network with named dynamic axes, then graph clean-up and checks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import onnx
import torch

from .networks import NetworkExport

OPSET = 17
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
TWO_GB = 2 * 1024**3
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx file
ALIGN_MIN_BYTES = 1 << 20  # tensors from 1 MiB start at a multiple of ALIGNMENT: ONNX Runtime
ALIGNMENT = 1 << 16  # maps them from the file instead of copying (64 KiB: Windows' granularity)


def onnx_opset(dynamo: bool, opset: int = OPSET) -> int:
    """The opset the exporter writes: ``opset``, raised to the dynamo exporter's minimum."""
    return max(opset, DYNAMO_MIN_OPSET) if dynamo else opset


def export_onnx(spec: NetworkExport, sizes: dict[str, int], path: Path, dynamo: bool = False,
                opset: int = OPSET, ort_flavour: bool = False, store: "WeightStore | None" = None,
                external: bool = False) -> list[Path]:
    """Trace ``spec.module`` (``spec.ort_module`` with ``ort_flavour``) at ``sizes`` and
    write ``path`` (+ external data over 2 GB or with ``external``, into ``store`` when
    given: the flavours of a network, and the UNet's DeepCache graphs, share one weight file).

    Returns the files written (the .onnx and, for large models, its .data file).
    """
    module = (spec.ort_module if ort_flavour else spec.module).eval()
    args = spec.example(sizes)
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    tmp_dir = path.parent / f".{path.stem}.export"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    tmp = tmp_dir / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo and not ort_flavour:  # the fused-attention symbolic is TorchScript's
            dims = {}
            for t, a in zip(spec.inputs, args):
                dims[t.name] = {i: torch.export.Dim(d, min=1) for i, d in enumerate(t.dims) if isinstance(d, str)}
            torch.onnx.export(module, args, str(tmp), input_names=names_in, output_names=names_out,
                              opset_version=onnx_opset(True, opset), dynamo=True, dynamic_shapes=dims,
                              external_data=True)
        else:
            torch.onnx.export(module, args, str(tmp), input_names=names_in, output_names=names_out,
                              opset_version=opset, dynamo=False, dynamic_axes=spec.dynamic_axes(),
                              do_constant_folding=True,
                              custom_opsets={"com.microsoft": 1} if ort_flavour else None)
    # the graph without its weights: they stay in the exporter's files until saved, one
    # tensor at a time, into ``store`` (weights never held twice in memory)
    model = onnx.load(str(tmp), load_external_data=False)
    try:
        _inline_small(model, tmp_dir)  # shape inference and folding read such constants
        with _cwd(tmp_dir):  # constant folding reads weights lazily, relative to the graph
            model = clean_graph(model)
        apply_contract(model, spec)
        return save_onnx(model, path, src_dir=tmp_dir, store=store, external=external)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def apply_contract(model: onnx.ModelProto, spec: NetworkExport) -> None:
    """Write the contract's dims (named or fixed) onto the graph's inputs and outputs; the
    exporter invents names such as 'Transposenoise_pred_dim_1' for dims it cannot infer."""
    declared = {t.name: t.dims for t in spec.inputs + spec.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = declared.get(vi.name)
        if dims is None:
            continue
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            entry = shape.dim.add()
            if isinstance(d, str):
                entry.dim_param = d
            else:
                entry.dim_value = int(d)


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node clean-up and topological sort (ONNX-GraphSurgeon), then
    shape inference; inputs/outputs and their dim names are kept."""
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)

    graph = gs.import_onnx(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph.fold_constants()
        except Exception:  # noqa: BLE001 - folding is an optimisation; the graph stays valid
            pass
    graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    cleaned.ir_version = model.ir_version
    if _fits_proto(cleaned) and cleaned.ByteSize() < TWO_GB:  # protobuf refuses to size > 2 GB
        cleaned = onnx.shape_inference.infer_shapes(cleaned)
    return cleaned


class WeightStore:
    """One external-data file that several graphs reference: a tensor is written once (by
    content, sha256) and every graph holding the same bytes points at the same offset."""

    def __init__(self, path: Path):
        self.path = path
        self._offsets: dict[str, tuple[int, int]] = {}
        self._size = 0

    def add(self, data: bytes) -> tuple[int, int]:
        """(offset, length) of ``data`` in the file, appending it if it is new."""
        key = hashlib.sha256(data).hexdigest()
        found = self._offsets.get(key)
        if found is not None:
            return found
        with open(self.path, "ab") as fh:
            pad = (-self._size) % ALIGNMENT if len(data) >= ALIGN_MIN_BYTES else 0
            fh.write(b"\0" * pad)
            fh.write(data)
        self._offsets[key] = (self._size + pad, len(data))
        self._size += pad + len(data)
        return self._offsets[key]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers, from their dims (nothing is loaded)."""
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _tensor_bytes(t: onnx.TensorProto, src_dir: Path | None) -> bytes:
    """A tensor's little-endian bytes, from its raw data, typed fields or external file."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if src_dir is None:
            raise ValueError(f"{t.name}: external data without a folder to read it from")
        with open(src_dir / info["location"], "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            return fh.read(int(info["length"])) if "length" in info else fh.read()
    if t.raw_data:
        return t.raw_data
    return onnx.numpy_helper.to_array(t).astype(
        onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<")).tobytes()


def _inline_small(model: onnx.ModelProto, src_dir: Path) -> None:
    """Bring external tensors under ``EXTERNAL_MIN_BYTES`` (shapes, scalars) into the graph."""
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if "length" in info and int(info["length"]) >= EXTERNAL_MIN_BYTES:
            continue
        data = _tensor_bytes(t, src_dir)
        if len(data) < EXTERNAL_MIN_BYTES:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data


def save_onnx(model: onnx.ModelProto, path: Path, src_dir: Path | None = None,
              store: WeightStore | None = None, external: bool = False) -> list[Path]:
    """Save and check. When the weights pass 2 GB (or ``store`` already holds some, or
    ``external``) every
    tensor from ``EXTERNAL_MIN_BYTES`` goes to the external-data file (``store``, else
    ``<name>.data``), one tensor in memory at a time; ``src_dir`` is where the graph's
    current external data lives."""
    large = external or weight_bytes(model) >= TWO_GB or (store is not None and store.path.exists())
    if not large:
        if src_dir is not None and any(t.data_location == onnx.TensorProto.EXTERNAL
                                       for t in model.graph.initializer):
            onnx.load_external_data_for_model(model, str(src_dir))
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
        return [path]
    store = store or WeightStore(path.with_suffix(".onnx.data"))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.STRING:
            continue
        data = _tensor_bytes(t, src_dir)
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                     "uint64_data", "string_data"):
            t.ClearField(name)
        del t.external_data[:]
        if len(data) < EXTERNAL_MIN_BYTES:  # inline: shape inference reads such constants
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
            continue
        offset, length = store.add(data)
        del data
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", store.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return [path, store.path]


def _fits_proto(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # noqa: BLE001 - protobuf refuses to size > 2 GB messages
        return False


def graph_io(path: Path) -> dict[str, dict[str, list]]:
    """{"inputs"|"outputs": {name: [dim name or int, ...]}} as stored in the ONNX graph."""
    model = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in vi.type.tensor_type.shape.dim]

    return {"inputs": {vi.name: dims(vi) for vi in model.graph.input},
            "outputs": {vi.name: dims(vi) for vi in model.graph.output}}
