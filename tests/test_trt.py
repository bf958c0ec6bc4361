"""export/trt.py: every piece that does not need TensorRT, the type check, and (marked
``tensorrt``) a tiny engine built and compared against ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from apla_rt.backends.compare import TIMESTEPS, seeded_inputs
from apla_rt.errors import BackendUnavailable, ConfigError
from apla_rt.backends import gpu as G
from export import trt as T

ROOT = Path(__file__).resolve().parents[1]

UNET_INPUTS = [
    {"name": "sample", "dtype": "float32", "dims": ["batch", 4, "frames", "height", "width"]},
    {"name": "timestep", "dtype": "int64", "dims": ["batch"]},
    {"name": "encoder_hidden_states", "dtype": "float32", "dims": ["batch", 77, 768]},
]
UNET_PROFILE = {"batch": [1, 2, 2], "frames": [1, 8, 24], "height": [8, 64, 96], "width": [8, 64, 96]}

TINY_INPUTS = [
    {"name": "sample", "dtype": "float32", "dims": ["frames", 8]},
    {"name": "timestep", "dtype": "int64", "dims": [1]},
]
TINY_PROFILE = {"frames": [1, 4, 6]}


# --------------------------------------------------------------------------- tiny ONNX models


def _export(module, args, path: Path, names_in, names_out, axes, opset=17) -> Path:
    torch = require("torch")
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path


def _tiny_model(seed: int):
    torch = require("torch")

    class Tiny(torch.nn.Module):
        """Linear + LayerNorm + softmax over a dynamic frames axis, plus an int64 timestep."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 16)
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, sample, timestep):
            h = self.lin(sample) + timestep.float()[:, None] / 1000
            return torch.softmax(self.norm(h) * 4, dim=-1)

    torch.manual_seed(seed)
    return Tiny(), (torch.randn(4, 8), torch.tensor([3]))


def _tiny_onnx(path: Path, seed: int = 0, opset: int = 17) -> Path:
    model, args = _tiny_model(seed)
    return _export(model, args, path, ["sample", "timestep"], ["probs"], {"sample": {0: "frames"}}, opset)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return _tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


# --------------------------------------------------------------------------- profile shapes


def test_profile_shapes_unet():
    shapes = T.profile_shapes(UNET_INPUTS, UNET_PROFILE)
    assert shapes["sample"] == ((1, 4, 1, 8, 8), (2, 4, 8, 64, 64), (2, 4, 24, 96, 96))
    assert shapes["timestep"] == ((1,), (2,), (2,))
    assert shapes["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (2, 77, 768))
    assert list(shapes) == ["sample", "timestep", "encoder_hidden_states"]


def test_profile_shapes_fixed_only_and_equal_range():
    shapes = T.profile_shapes([{"name": "x", "dtype": "float32", "dims": [3, "f"]}], {"f": [5, 5, 5]})
    assert shapes == {"x": ((3, 5), (3, 5), (3, 5))}


@pytest.mark.parametrize("inputs, profile, fragment", [
    (TINY_INPUTS, {}, "has no range"),
    (TINY_INPUTS, {"frames": [4, 2, 6]}, "min <= opt <= max"),
    (TINY_INPUTS, {"frames": [1, 8, 6]}, "min <= opt <= max"),
    (TINY_INPUTS, {"frames": [0, 4, 6]}, ">= 1"),
    (TINY_INPUTS, {"frames": [-2, 4, 6]}, ">= 1"),
    (TINY_INPUTS, {"frames": [1, 4]}, "three integers"),
    (TINY_INPUTS, {"frames": [1.0, 4, 6]}, "three integers"),
    (TINY_INPUTS, {"frames": [True, 4, 6]}, "three integers"),
    (TINY_INPUTS, {"frames": "1..6"}, "three integers"),
    (TINY_INPUTS, [1, 4, 6], "profile must map"),
    ([{"name": "x", "dims": [0, "frames"]}], TINY_PROFILE, "fixed dim 0"),
    ([{"name": "x", "dims": [2.5]}], TINY_PROFILE, "neither an integer nor a name"),
    ([{"name": "x", "dims": "frames"}], TINY_PROFILE, "must be a list"),
    ([{"dims": ["frames"]}], TINY_PROFILE, "needs a 'name'"),
    ([{"name": "x", "dims": [1]}, {"name": "x", "dims": [1]}], TINY_PROFILE, "listed twice"),
])
def test_profile_shapes_rejects(inputs, profile, fragment):
    with pytest.raises(ConfigError) as err:
        T.profile_shapes(inputs, profile)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_check_network_inputs():
    shapes = T.profile_shapes(TINY_INPUTS, TINY_PROFILE)
    T.check_network_inputs({"sample": (-1, 8), "timestep": (1,)}, shapes)
    with pytest.raises(ConfigError, match="missing"):
        T.check_network_inputs({"sample": (-1, 8), "timestep": (1,), "extra": (1,)}, shapes)
    with pytest.raises(ConfigError, match="unknown"):
        T.check_network_inputs({"sample": (-1, 8)}, shapes)
    with pytest.raises(ConfigError, match="does not fit"):
        T.check_network_inputs({"sample": (-1, 9), "timestep": (1,)}, shapes)
    with pytest.raises(ConfigError, match="does not fit"):
        T.check_network_inputs({"sample": (-1, 8, 1), "timestep": (1,)}, shapes)


# --------------------------------------------------------------------------- file names


def test_filename_conventions(tmp_path):
    assert T.engine_filename("unet") == "unet.plan"
    assert T.engine_filename("text_encoder") == "text_encoder.plan"
    assert T.timing_cache_path(tmp_path) == tmp_path / "timing.cache"
    assert T.timing_cache_path(str(tmp_path)).name == T.TIMING_CACHE_NAME
    for bad in ("", "../unet", "a/b", ".hidden", "un et"):
        with pytest.raises(ConfigError):
            T.engine_filename(bad)


# --------------------------------------------------------------------------- FP32 layers


@pytest.mark.parametrize("layer_type, name, expected", [
    ("NORMALIZATION", "/down_blocks.0/attentions.0/norm/LayerNormalization", True),
    ("NORMALIZATION", "/conv_norm_out/InstanceNormalization", True),
    ("LayerType.SOFTMAX", "/attn1/Softmax", True),
    ("softmax", "anything", True),
    ("MATRIX_MULTIPLY", "/attn1/MatMul", False),
    ("CONVOLUTION", "/conv_norm_out/Conv", False),      # in a norm scope, but no arithmetic
    ("ACTIVATION", "/norm1/Sigmoid", False),
    ("ELEMENTWISE", "/attn1/Add", False),
    ("ELEMENTWISE", "/ff/net.0/Mul_1", False),
    ("REDUCE", "/pool/ReduceMax", False),
    # decomposed LayerNorm (opset < 17): the whole chain inside a norm scope ...
    ("REDUCE", "/text_model/encoder/layers.0/layer_norm1/ReduceMean", True),
    ("REDUCE", "/norm/ReduceMean_1", True),
    ("ELEMENTWISE", "/norm1/Pow", True),
    ("ELEMENTWISE", "/norm1/Sub", True),
    ("ELEMENTWISE", "/norm1/Add", True),
    ("UNARY", "/norm/Sqrt", True),
    ("ELEMENTWISE", "/ln_f/Div", True),
    # ... and its overflow-prone ops anywhere, even without scope names
    ("ELEMENTWISE", "Pow_12", True),
    ("UNARY", "/blocks.3/Sqrt_2", True),
    ("REDUCE", "ReduceMean_7", True),
])
def test_keep_in_fp32(layer_type, name, expected):
    assert T.keep_in_fp32(layer_type, name) is expected


def test_select_fp32_layers_and_custom_types():
    layers = [("CONVOLUTION", "/conv_in/Conv"), ("NORMALIZATION", "/norm1/LayerNormalization"),
              ("MATRIX_MULTIPLY", "/attn1/MatMul"), ("SOFTMAX", "/attn1/Softmax"),
              ("ELEMENTWISE", "/norm2/Pow")]
    assert T.select_fp32_layers(layers) == [1, 3, 4]
    assert T.select_fp32_layers(layers, fp32_layer_types=("Softmax",)) == [3, 4]
    assert T.select_fp32_layers(layers, fp32_layer_types=()) == [4]
    assert T.select_fp32_layers([]) == []


def test_onnx_op_of_layer():
    assert T.onnx_op_of_layer("/norm/ReduceMean_1") == "ReduceMean"
    assert T.onnx_op_of_layer("Sqrt") == "Sqrt"
    assert T.onnx_op_of_layer("(Unnamed Layer* 3) [Shuffle]") == ""


def test_decomposed_layernorm_export_is_selected(tmp_path):
    """torch's opset-14 LayerNorm (node names as the TensorRT parser keeps them) is pinned."""
    onnx = require("onnx")
    model = onnx.load(str(_tiny_onnx(tmp_path / "m14.onnx", opset=14)))
    trt_type = {"ReduceMean": "REDUCE", "Pow": "ELEMENTWISE", "Sqrt": "UNARY", "Sub": "ELEMENTWISE",
                "Add": "ELEMENTWISE", "Div": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Softmax": "SOFTMAX",
                "Gemm": "MATRIX_MULTIPLY", "Cast": "CAST", "Constant": "CONSTANT",
                "Unsqueeze": "UNSQUEEZE"}
    layers = [(trt_type[n.op_type], n.name) for n in model.graph.node]
    chosen = {model.graph.node[i].name for i in T.select_fp32_layers(layers)}
    norm_math = {n.name for n in model.graph.node if n.name.startswith("/norm/") and n.op_type != "Constant"}
    assert {"ReduceMean", "Pow", "Sqrt"} <= {n.op_type for n in model.graph.node if n.name in chosen}
    assert norm_math <= chosen
    assert "/lin/Gemm" not in chosen and "/Add" not in chosen


# --------------------------------------------------------------------------- comparison inputs


def test_comparison_inputs_and_seeded_inputs():
    shapes = T.profile_shapes(UNET_INPUTS, {"batch": [1, 2, 2], "frames": [1, 3, 4],
                                            "height": [2, 4, 6], "width": [2, 4, 6]})
    dtypes = {"sample": "float32", "timestep": np.int64, "encoder_hidden_states": np.dtype("float32")}
    meta = T.comparison_inputs(dtypes, shapes, "opt")
    assert meta == {"sample": (np.dtype("float32"), (2, 4, 3, 4, 4)), "timestep": (np.dtype("int64"), (2,)),
                    "encoder_hidden_states": (np.dtype("float32"), (2, 77, 768))}
    assert T.comparison_inputs(dtypes, shapes, "min")["sample"][1] == (1, 4, 1, 2, 2)
    assert T.comparison_inputs(dtypes, shapes, "max")["sample"][1] == (2, 4, 4, 6, 6)

    meta["timestep"] = (np.dtype("int64"), (4096,))
    feeds = seeded_inputs(meta, seed=0)
    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {k: v for k, v in meta.items()}
    t = feeds["timestep"]
    assert t.min() >= 0 and t.max() < TIMESTEPS and t.max() > 900
    assert abs(float(feeds["sample"].std()) - 1.0) < 0.2
    again = seeded_inputs(meta, seed=0)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    other = seeded_inputs(meta, seed=1)
    assert not np.array_equal(feeds["sample"], other["sample"])


def test_seeded_inputs_token_ids_images_masks():
    meta = {"input_ids": (np.dtype("int64"), (2, 2000)), "image": (np.dtype("float32"), (2, 3, 8, 8)),
            "attention_mask": (np.dtype("int32"), (2, 50)), "half": (np.dtype("float16"), (3,))}
    feeds = seeded_inputs(meta, seed=3, vocab_size=37)
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() == 36
    assert feeds["image"].min() >= -1 and feeds["image"].max() <= 1
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1}
    assert feeds["half"].dtype == np.float16
    with pytest.raises(ConfigError):
        seeded_inputs({"s": (np.dtype("U3"), (1,))}, seed=0)
    with pytest.raises(ConfigError):
        seeded_inputs(meta, seed=0, vocab_size=0)


def test_comparison_inputs_rejects():
    shapes = T.profile_shapes(TINY_INPUTS, TINY_PROFILE)
    with pytest.raises(ConfigError, match="shape set"):
        T.comparison_inputs({"sample": "float32"}, shapes, "mid")
    with pytest.raises(ConfigError, match="no profile shapes"):
        T.comparison_inputs({"sample": "float32", "other": "float32"}, shapes, "opt")


def test_onnx_input_spec(tiny_onnx, tmp_path):
    torch = require("torch")
    dtypes, vocab = T.onnx_input_spec(tiny_onnx)
    assert dtypes == {"sample": np.dtype("float32"), "timestep": np.dtype("int64")}
    assert vocab is None

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(37, 8)

        def forward(self, input_ids):
            return self.token_embedding(input_ids)

    path = _export(Embed(), (torch.zeros(1, 5, dtype=torch.long),), tmp_path / "embed.onnx",
                   ["input_ids"], ["last_hidden_state"], {"input_ids": {0: "batch"}})
    assert T.onnx_input_spec(path) == ({"input_ids": np.dtype("int64")}, 37)


def _ort_runner(path: Path, name: str):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)


def _tiny_feeds(path: Path):
    shapes = T.profile_shapes(TINY_INPUTS, TINY_PROFILE)
    dtypes, _ = T.onnx_input_spec(path)
    return [(w, seeded_inputs(T.comparison_inputs(dtypes, shapes, w), i))
            for i, w in enumerate(("opt", "min", "max"))]


def test_compare_runners_summary(tiny_onnx, tmp_path):
    """The summary code, with ONNX Runtime standing in for the engine."""
    decomposed = _tiny_onnx(tmp_path / "m14.onnx", opset=14)
    fused_vs_decomposed = [_ort_runner(tiny_onnx, "a"), _ort_runner(decomposed, "b")]
    summary = T.compare_runners(fused_vs_decomposed, _tiny_feeds(tiny_onnx), atol=1e-5, rtol=1e-4)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["passed"] is True
    assert summary["runners"] == ["a", "b"]
    assert summary["shapes"]["min"] == {"sample": [1, 8], "timestep": [1]}
    assert summary["shapes"]["max"]["sample"] == [6, 8]
    assert list(summary["per_shape"]) == ["opt", "min", "max"]
    assert summary["outputs"]["probs"]["max_abs"] < 1e-5

    different = [_ort_runner(tiny_onnx, "a"), _ort_runner(_tiny_onnx(tmp_path / "other.onnx", seed=1), "b")]
    summary = T.compare_runners(different, _tiny_feeds(tiny_onnx), atol=1e-5, rtol=1e-4)
    assert summary["passed"] is False
    assert all(not s["passed"] for s in summary["per_shape"].values())
    probs = summary["outputs"]["probs"]
    assert probs["passed"] is False and probs["max_abs"] >= probs["mean_abs"] > 1e-3


# --------------------------------------------------------------------------- availability


def test_trt_available_here():
    ok, why = T.trt_available()
    if ok:
        pytest.skip("TensorRT and a GPU are present here")
    assert ok is False and why and "\n" not in why
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert why.startswith("TensorRT is not installed (pip install tensorrt")
        for call in (lambda: T.build_engine("x.onnx", "x.plan", {}),
                     lambda: T.compare_engine_with_onnxrt("x.onnx", "x.plan", {}, 1e-2, 1e-2),
                     lambda: T.build_all(".", {"networks": {}}, True, print)):
            with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
                call()


def test_trt_available_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert G.trt_available() == (False, f"TensorRT is not installed ({G.INSTALL_HINT})")

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(G, "cuda_device_count", lambda: (0, "libcuda is not found"))
    assert G.trt_available() == (False, "no CUDA GPU is visible (libcuda is not found)")
    monkeypatch.setattr(G, "cuda_device_count", lambda: (0, ""))
    assert G.trt_available() == (False, "no CUDA GPU is visible")

    monkeypatch.setattr(G, "cuda_device_count", lambda: (1, ""))
    monkeypatch.setattr(G, "cudart_loadable", lambda: "libcudart cannot be loaded")
    assert G.trt_available() == (False, "libcudart cannot be loaded")
    monkeypatch.setattr(G, "cudart_loadable", lambda: "")
    assert G.trt_available() == (True, "")


def test_cuda_device_count_never_raises():
    count, why = G.cuda_device_count()
    assert count >= 0 and (count > 0 or why)


def test_module_imports_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None; import export.trt; "
            "assert 'polygraphy.backend.trt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --------------------------------------------------------------------------- type checking


def test_typecheck_script():
    """tools/typecheck.sh: TensorRT calls checked against tensorrt-stubs, mypy clean."""
    proc = subprocess.run(["bash", "tools/typecheck.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3 and "cannot download tensorrt-stubs" in proc.stderr:
        pytest.skip("tensorrt-stubs cannot be downloaded here (no network): " + proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.tensorrt
def test_tiny_engine_fp16_matches_onnxrt(tiny_onnx, tmp_path):
    ok, why = T.trt_available()
    if not ok:
        pytest.skip(why)
    shapes = T.profile_shapes(TINY_INPUTS, TINY_PROFILE)
    plan = tmp_path / T.engine_filename("tiny")
    cache = T.timing_cache_path(tmp_path)
    messages: list[str] = []
    T.build_engine(tiny_onnx, plan, shapes, fp16=True, timing_cache=cache, log=messages.append)
    assert plan.stat().st_size > 0 and cache.is_file()
    assert any("pinned to FP32" in m for m in messages)
    summary = T.compare_engine_with_onnxrt(tiny_onnx, plan, shapes, *T.FP16_TOLERANCE)
    assert summary["passed"], summary
    assert set(summary["per_shape"]) == {"opt", "min"}  # export.trt_plan: never the max

    # The folder path: a manifest with one ONNX network and one without.
    (tmp_path / "tiny.onnx").write_bytes(tiny_onnx.read_bytes())
    manifest = {"networks": {
        "tiny": {"onnx": "tiny.onnx", "engine": None, "inputs": TINY_INPUTS,
                 "outputs": [{"name": "probs", "dtype": "float32", "dims": ["frames", 16]}],
                 "profile": TINY_PROFILE},
        "no_onnx": {"onnx": None, "engine": None},
    }, "files": {}}
    out = T.build_all(tmp_path, manifest, fp16=True, log=messages.append)
    assert manifest["networks"]["tiny"]["engine"] is None  # the input is not modified
    assert out["networks"]["tiny"]["engine"] == "tiny.plan"
    assert out["networks"]["tiny"]["trt_check"]["passed"]
    assert out["networks"]["no_onnx"]["engine"] is None
    assert "tiny.plan" in out["files"] and out["versions"]["tensorrt"]
    assert out["networks"]["tiny"]["trt_status"] == "ok"
    assert out["networks"]["tiny"]["trt_check"]["reference"] == "tiny.onnx"

    # A tolerance miss without strict: the plan is dropped, the network marked failed, one line.
    (tmp_path / "tiny.plan").unlink()
    lines: list[str] = []
    missed = T.build_all(tmp_path, manifest, fp16=True, log=lines.append, tolerance=(0.0, 0.0), strict=False)
    tiny = missed["networks"]["tiny"]
    assert tiny["engine"] is None and tiny["trt_status"] == "failed" and not tiny["trt_check"]["passed"]
    assert not (tmp_path / "tiny.plan").exists() and "tiny.plan" not in missed["files"]
    assert [line for line in lines if "FAILED its check" in line and "runs on ONNX Runtime" in line]
