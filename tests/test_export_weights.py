"""export.onnx_export's weight handling, on hand-made graphs: a graph whose weights are in
per-tensor files (as torch's TorchScript exporter writes a model over 2 GB) is cleaned and
saved without loading them all, into one external-data file that a second graph shares."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from export import onnx_export


def _graph(weights: dict[str, np.ndarray], extra_scale: float | None = None) -> onnx.ModelProto:
    """x @ w0 @ w1 (+ a folded-away Transpose of w1's twin), then * scale."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("Transpose", ["w1t"], ["w1"], perm=[1, 0]),  # constant: folded
             helper.make_node("MatMul", ["h", "w1"], ["y0"]),
             helper.make_node("Mul", ["y0", "scale"], ["y"])]
    inits = [numpy_helper.from_array(weights["w0"], "w0"), numpy_helper.from_array(weights["w1"].T.copy(), "w1t"),
             numpy_helper.from_array(np.array(extra_scale or 1.0, np.float32), "scale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_tensor_weights_are_cleaned_and_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TWO_GB", 1024)  # this graph counts as "large"
    rng = np.random.default_rng(0)
    weights = {"w0": rng.standard_normal((64, 128), dtype=np.float32),
               "w1": rng.standard_normal((128, 32), dtype=np.float32)}
    x = rng.standard_normal((3, 64), dtype=np.float32)
    out = tmp_path / "out"
    out.mkdir()
    store = onnx_export.WeightStore(out / "net.onnx.data")
    results = []
    for i, scale in enumerate((1.0, 2.0)):  # two "flavours": same weights, a different graph
        src = tmp_path / f"src{i}"
        src.mkdir()
        onnx.save(_graph(weights, scale), str(src / "model.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=False, size_threshold=1024)
        assert len(list(src.iterdir())) > 2  # one file per large tensor
        model = onnx.load(str(src / "model.onnx"), load_external_data=False)
        with onnx_export._cwd(src):
            model = onnx_export.clean_graph(model)
        assert "Transpose" not in [n.op_type for n in model.graph.node]  # folded from the files
        files = onnx_export.save_onnx(model, out / f"net{i}.onnx", src_dir=src, store=store)
        assert files == [out / f"net{i}.onnx", out / "net.onnx.data"]
        results.append(_run(files[0], x))
    expected = x @ weights["w0"] @ weights["w1"]
    np.testing.assert_allclose(results[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results[1], 2 * expected, rtol=1e-4, atol=1e-4)
    # each weight once in the shared file; both graphs point at the same offsets
    spans = []
    for i in range(2):
        model = onnx.load(str(out / f"net{i}.onnx"), load_external_data=False)
        ext = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
        spans.append({(int(e["offset"]), int(e["length"])) for e in ext.values()})
        assert all(e["location"] == "net.onnx.data" for e in ext.values())
        small = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert small and all(len(t.raw_data) < onnx_export.EXTERNAL_MIN_BYTES for t in small)
    assert spans[0] == spans[1]
    size = (out / "net.onnx.data").stat().st_size
    assert sum(w.nbytes for w in weights.values()) <= size < sum(w.nbytes for w in weights.values()) + 2 * 4096


def test_small_graphs_stay_in_one_file(tmp_path):
    rng = np.random.default_rng(1)
    weights = {"w0": rng.standard_normal((64, 128), dtype=np.float32),
               "w1": rng.standard_normal((128, 32), dtype=np.float32)}
    files = onnx_export.save_onnx(_graph(weights), tmp_path / "net.onnx",
                                  store=onnx_export.WeightStore(tmp_path / "net.onnx.data"))
    assert files == [tmp_path / "net.onnx"] and sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]
