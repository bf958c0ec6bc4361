"""ONNX export of one network with named dynamic axes, then graph clean-up and checks."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch

from .networks import NetworkExport

OPSET = 17
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
TWO_GB = 2 * 1024**3


def onnx_opset(dynamo: bool, opset: int = OPSET) -> int:
    """The opset the exporter writes: ``opset``, raised to the dynamo exporter's minimum."""
    return max(opset, DYNAMO_MIN_OPSET) if dynamo else opset


def export_onnx(spec: NetworkExport, sizes: dict[str, int], path: Path, dynamo: bool = False,
                opset: int = OPSET, ort_flavour: bool = False) -> list[Path]:
    """Trace ``spec.module`` (``spec.ort_module`` with ``ort_flavour``) at ``sizes`` and
    write ``path`` (+ external data over 2 GB).

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
    model = onnx.load(str(tmp), load_external_data=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model = clean_graph(model)
    apply_contract(model, spec)
    return save_onnx(model, path)


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


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save and check; tensors go to ``<name>.data`` when the model passes 2 GB."""
    large = model.ByteSize() >= TWO_GB if _fits_proto(model) else True
    if large:
        data = path.with_suffix(".onnx.data")
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
        onnx.checker.check_model(str(path))
        return [path, data]
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return [path]


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
