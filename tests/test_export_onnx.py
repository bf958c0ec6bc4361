"""apla-export's ONNX files, from the session's main tiny run exported once (conftest.py):
one ok line per network, ``onnx.checker``, graph names and named dynamic dims against the
manifest and the documented contract, the opset, the UNet's portable and fused-attention
flavours, external data over the protobuf limit, and the dynamo exporter on the VGT."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
from export_helpers import CONTRACT, N_FRAMES, NETWORKS, ONNX_DTYPES, ort_session, read_manifest

from export import pipeline


def test_export_logs_one_ok_line_per_network(ski_engines):
    _out, manifest, lines = ski_engines
    assert list(manifest["networks"]) == NETWORKS
    for name in NETWORKS:
        (line,) = [l for l in lines if l.startswith(name + " ")]
        assert line.endswith(": ok"), line
    assert not any("TensorRT" in l for l in lines)  # --backend onnx: not a word about engines


def test_onnx_files_pass_checker_and_match_the_manifest_and_contract(ski_engines):
    out, _, _ = ski_engines
    manifest = read_manifest(out)
    assert sorted(manifest["networks"]) == sorted(NETWORKS)
    for name, entry in manifest["networks"].items():
        path = out / entry["onnx"]
        assert entry["onnx"] == f"{name}.onnx" and path.is_file()
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        initializers = {t.name for t in model.graph.initializer}
        graph_inputs = [vi for vi in model.graph.input if vi.name not in initializers]
        want_in, want_out = CONTRACT[name]
        for graph_side, manifest_side, want in ((graph_inputs, entry["inputs"], want_in),
                                                (list(model.graph.output), entry["outputs"], want_out)):
            assert [vi.name for vi in graph_side] == [t["name"] for t in manifest_side] == list(want)
            for vi, spec in zip(graph_side, manifest_side):
                assert (spec["dtype"], spec["dims"]) == want[vi.name], (name, vi.name)
                assert vi.type.tensor_type.elem_type == ONNX_DTYPES[spec["dtype"]]
                dims = vi.type.tensor_type.shape.dim
                assert len(dims) == len(spec["dims"])
                for d, expected in zip(dims, spec["dims"]):
                    if isinstance(expected, str):  # a named dynamic dim: a string in the graph
                        assert d.HasField("dim_param") and d.dim_param == expected, (name, vi.name)
                    else:
                        assert d.HasField("dim_value") and d.dim_value == expected, (name, vi.name)
        # ONNX Runtime reads the same names and dims
        session = ort_session(path)
        assert [(i.name, list(i.shape)) for i in session.get_inputs()] == \
            [(t["name"], t["dims"]) for t in entry["inputs"]]


def test_versions_record_the_opset_of_the_files(ski_engines):
    out, _, _ = ski_engines
    manifest = read_manifest(out)
    for entry in manifest["networks"].values():
        model = onnx.load(str(out / entry["onnx"]), load_external_data=False)
        (opset,) = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        assert manifest["versions"]["opset"] == str(opset)


def test_unet_has_a_portable_onnx_and_a_fused_attention_onnx_runtime_flavour(ski_engines, torch_side):
    """unet.onnx uses only standard ops (what TensorRT parses); unet.ort.onnx replaces every
    attention by ONNX Runtime's fused MultiHeadAttention and computes the same thing."""
    out, manifest, _ = ski_engines
    entry = manifest["networks"]["unet"]
    assert entry["onnx"] == "unet.onnx" and entry["onnx_ort"] == "unet.ort.onnx"
    portable = onnx.load(str(out / "unet.onnx"))
    fused = onnx.load(str(out / "unet.ort.onnx"))
    assert {o.domain for o in portable.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in portable.graph.node)
    n_blocks = sum(1 for _ in torch_side[1].unet.transformer_blocks())
    mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 3 * n_blocks and all(n.domain == "com.microsoft" for n in mha)
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 3, 8, 8), dtype=np.float32),
             "timestep": np.array([10, 900], dtype=np.int64),
             "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32), dtype=np.float32)}
    a = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(str(out / "unet.ort.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(a).max() > 1e-3 and np.abs(a - b).max() < 1e-4


def test_models_over_the_protobuf_limit_use_external_data(ski_run, tmp_path, monkeypatch):
    """The > 2 GB path (SD's fp32 UNet is ~3.4 GB), with the limit lowered so tiny networks
    take it: tensors go to <name>.onnx.data, one file that the portable and the ORT-fused
    graphs share (each tensor stored once, both graphs pointing at the same bytes), the
    manifest lists and hashes it, onnx.checker and ONNX Runtime load both graphs from it, and
    the runtime samples from the folder."""
    from rt_run import generate

    from export import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 4096)
    out = tmp_path / "engines"
    manifest = pipeline.export_run(ski_run, out, backend="onnx", log=lambda _: None)
    unet = manifest["networks"]["unet"]
    assert unet["external_data"] == ["unet.onnx.data"] and not (out / "unet.ort.onnx.data").exists()
    data = (out / "unet.onnx.data").read_bytes()
    assert manifest["files"]["unet.onnx.data"] == hashlib.sha256(data).hexdigest()
    graphs = {name: onnx.load(str(out / name), load_external_data=False) for name in ("unet.onnx", "unet.ort.onnx")}
    spans = {}
    for name, model in graphs.items():
        assert len(data) > (out / name).stat().st_size
        ext = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and all(e["location"] == "unet.onnx.data" for e in ext)
        spans[name] = {(int(e["offset"]), int(e["length"])) for e in ext}
        onnx.checker.check_model(str(out / name))
    # stored once: the file holds the union of both graphs' tensors (plus alignment), and
    # the fused graph reuses the portable graph's bytes instead of copies of them
    union = spans["unet.onnx"] | spans["unet.ort.onnx"]
    assert sum(n for _, n in union) <= len(data) < sum(n for _, n in union) + len(union) * onnx_export.ALIGNMENT
    shared = spans["unet.onnx"] & spans["unet.ort.onnx"]
    assert sum(n for _, n in shared) > 0.9 * sum(n for _, n in spans["unet.ort.onnx"])
    weights = {t.name: onnx.numpy_helper.to_array(t, str(out)) for t in graphs["unet.onnx"].graph.initializer}
    assert any(w.size > 1000 and np.abs(w).max() > 0 for w in weights.values())
    result = generate(out, "a man is skiing", steps=2)
    assert result.frames.shape[0] == json.loads((ski_run / "config.json").read_text())["data"]["n_frames"]


def test_dynamo_exporter_vgt_has_named_dims_and_matches_pytorch(torch_side, tmp_path):
    from export.networks import network_specs
    from export.onnx_export import export_onnx, graph_io, onnx_opset
    from export.validate import validate_network

    cfg, components, vgt, _ = torch_side
    specs = network_specs(components, vgt, cfg, pipeline.frame_profile(cfg, None, None, None))
    (spec,) = [s for s in specs if s.name == "vgt"]
    files = export_onnx(spec, spec.validate_at[0], tmp_path / "vgt.onnx", dynamo=True)
    assert files == [tmp_path / "vgt.onnx"] and not list(tmp_path.glob(".*"))
    onnx.checker.check_model(str(files[0]), full_check=True)
    model = onnx.load(str(files[0]))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [onnx_opset(True)]
    io = graph_io(files[0])
    assert io["inputs"] == {"sample": CONTRACT["vgt"][0]["sample"][1], "timestep": ["batch"]}
    assert io["outputs"] == {"delta": CONTRACT["vgt"][1]["delta"][1]}
    result = validate_network(spec, files[0], threads=2)
    assert result["passed"], result
    assert {c["shape"]["frames"] for c in result["checks"]} == {N_FRAMES, 3, 12}
