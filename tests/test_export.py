"""apla-export on tiny runs: the engine folder contract of docs/architecture.md and docs/export.md.

Three tiny runs are trained once per session (4 frames of man-skiing.mp4 at 32 px, 8x8
latents): the main one (hyper VGT, 2 steps, checkpoints at steps 1 and 2), one with
``vgt.kind=none`` and one with ``vgt.source=true`` (1 step each). Each is exported once:
the main run through ``export_run`` (``backend="onnx"``), the other two through the CLI
(``--backend onnx --force`` over a copy of the main folder; ``--backend auto`` with the
default ``--out``). Every other test reads those folders or makes exports fail early.

The ONNX files are checked against PyTorch by these tests themselves: the networks are
rebuilt from the run with ``export.pipeline.load_run`` and run in ONNX Runtime at frame
counts and batch sizes other than the traced ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result

from apla_rt.errors import AplaError, IntegrityError
from apla_rt.schedule import SchedulerConfig
from export import pipeline
from export.cli import main as export_cli
from export.trt import trt_available

from conftest import clip_path

PROMPT = "a man is skiing"
N_FRAMES, SIZE = 4, 32  # 8x8 latents with the tiny preset's 4-pixel patches
LATENT, HIDDEN, SEQ = 8, 32, 77  # latent side, tiny text encoder width, tokenizer length
NETWORKS = ["text_encoder", "unet", "vgt", "vae_decoder", "vae_encoder"]

# The ONNX contract of docs/architecture.md, instantiated for the tiny runs.
CONTRACT = {
    "text_encoder": ({"input_ids": ("int64", ["batch", SEQ])},
                     {"last_hidden_state": ("float32", ["batch", SEQ, HIDDEN])}),
    "unet": ({"sample": ("float32", ["batch", 4, "frames", "height", "width"]),
              "timestep": ("int64", ["batch"]),
              "encoder_hidden_states": ("float32", ["batch", SEQ, HIDDEN])},
             {"noise_pred": ("float32", ["batch", 4, "frames", "height", "width"])}),
    "vgt": ({"sample": ("float32", ["batch", 4, "frames", LATENT, LATENT]),
             "timestep": ("int64", ["batch"])},
            {"delta": ("float32", ["batch", 4, "frames", LATENT, LATENT])}),
    "vae_decoder": ({"latent": ("float32", ["frames", 4, "height", "width"])},
                    {"image": ("float32", ["frames", 3, "image_height", "image_width"])}),
    "vae_encoder": ({"image": ("float32", ["frames", 3, "image_height", "image_width"])},
                    {"latent": ("float32", ["frames", 4, "height", "width"])}),
}
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


# --------------------------------------------------------------------------- helpers


def train_tiny(run: Path, steps: int, overrides: tuple[str, ...] = (), flags: dict | None = None,
               sample_steps: int = 2) -> Path:
    from apla_train.cli import build_config
    from apla_train.train import train

    cfg = build_config(video=str(clip_path("man-skiing.mp4")), prompt=PROMPT, model="tiny", pretrained=None,
                       config_file=None,
                       overrides=(f"sample.steps={sample_steps}", f"sample.inversion_steps={sample_steps}",
                                  "train.checkpoint_every=1",
                                  *overrides),
                       flags={"train.steps": steps, "data.n_frames": N_FRAMES, "data.size": SIZE, **(flags or {})})
    train(cfg, run, log=lambda _msg: None, progress=False)
    return run


def invoke(*args) -> Result:
    return CliRunner().invoke(export_cli, [str(a) for a in args], catch_exceptions=False)


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result, needle: str, code: int = 2) -> str:
    """Exit ``code``, stderr exactly one ``error: ...`` line containing ``needle``, no traceback."""
    assert result.exit_code == code, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Hidden siblings of ``out`` other than its lock file: .partial builds, .old swaps, .export dirs."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.lock")


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@functools.lru_cache(maxsize=None)
def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def resolve(dims: list, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in dims)


def compare_with_torch(folder: Path, name: str, feeds: dict[str, np.ndarray], reference: torch.Tensor,
                       sizes: dict[str, int]) -> float:
    """Run ``name``'s ONNX on ``feeds``; check its output's shape (from the manifest's dims),
    finiteness and max abs error against ``reference`` within the manifest's tolerance."""
    entry = read_manifest(folder)["networks"][name]
    (out_spec,) = entry["outputs"]
    (got,) = ort_session(folder / entry["onnx"]).run([out_spec["name"]], feeds)
    ref = reference.detach().float().numpy()
    assert got.shape == resolve(out_spec["dims"], sizes) == ref.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= entry["tolerance"]["max_abs"], f"{name} at {sizes}: max abs {err:.3g}"
    assert np.abs(ref).max() > 10 * entry["tolerance"]["max_abs"]  # a real signal, not zeros
    return err


# --------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def ski_run(export_root) -> Path:
    """The main tiny run: hyper VGT, 2 steps, checkpoints at steps 1 and 2."""
    return train_tiny(export_root / "runs" / "ski", steps=2)


@pytest.fixture(scope="session")
def ski_engines(ski_run, export_root) -> tuple[Path, dict, list[str]]:
    """The main run exported once (ONNX only): (folder, returned manifest, log lines)."""
    lines: list[str] = []
    out = export_root / "engines" / "ski"
    manifest = pipeline.export_run(ski_run, out, backend="onnx", log=lines.append)
    return out, manifest, lines


@pytest.fixture(scope="session")
def torch_side(ski_run):
    """The main run's networks rebuilt in PyTorch: (cfg, components, vgt, checkpoint)."""
    return pipeline.load_run(ski_run)


@pytest.fixture(scope="session")
def novgt_run(export_root) -> Path:
    return train_tiny(export_root / "runs" / "ski-novgt", steps=1, flags={"vgt.kind": "none"},
                      sample_steps=1)


@pytest.fixture(scope="session")
def source_run(export_root) -> Path:
    return train_tiny(export_root / "runs" / "ski-source", steps=1, overrides=("vgt.source=true",),
                      sample_steps=1)


@pytest.fixture(scope="session")
def onnx_force_export(ski_engines, novgt_run, export_root):
    """``--backend onnx --force`` of the VGT-less run over a copy of the main engine folder:
    (CLI result, folder, snapshot of the folder it replaced)."""
    out = export_root / "replaced" / "ski"
    shutil.copytree(ski_engines[0], out)
    before = snapshot(out)
    result = invoke("--run", novgt_run, "--out", out, "--backend", "onnx", "--force")
    return result, out, before


@pytest.fixture(scope="session")
def auto_default_out_export(source_run, export_root):
    """``--backend auto`` without --out, cwd = an empty folder, on the vgt.source run:
    (CLI result, cwd)."""
    cwd = export_root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = invoke("--run", source_run.resolve(), "--backend", "auto")
    return result, cwd


# --------------------------------------------------------------------------- ONNX files


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


# --------------------------------------------------------------------------- ORT vs PyTorch


@pytest.mark.parametrize("frames", [2, 7])
@pytest.mark.parametrize("batch", [1, 2])
def test_unet_onnxruntime_matches_pytorch_at_untraced_frame_counts(ski_engines, torch_side, batch, frames):
    out, _, _ = ski_engines
    manifest = read_manifest(out)
    lo, opt, hi = manifest["networks"]["unet"]["profile"]["frames"]
    assert frames != opt == manifest["train_frames"] == N_FRAMES and lo <= frames <= hi  # traced at opt
    _, components, _, _ = torch_side
    rng = np.random.default_rng(10 * batch + frames)
    feeds = {"sample": rng.standard_normal((batch, 4, frames, LATENT, LATENT)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64),
             "encoder_hidden_states": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}
    with torch.no_grad():
        ref = components.unet(*(torch.from_numpy(v) for v in feeds.values()))
    compare_with_torch(out, "unet", feeds, ref,
                       {"batch": batch, "frames": frames, "height": LATENT, "width": LATENT})


@pytest.mark.parametrize("batch, frames", [(1, 1), (2, 3), (1, 9), (2, 16)])
def test_vgt_onnxruntime_matches_pytorch(ski_engines, torch_side, batch, frames):
    out, _, _ = ski_engines
    _, _, vgt, _ = torch_side
    rng = np.random.default_rng(100 + 10 * batch + frames)
    feeds = {"sample": rng.standard_normal((batch, 4, frames, LATENT, LATENT)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64)}
    with torch.no_grad():
        ref = vgt(*(torch.from_numpy(v) for v in feeds.values()))
    compare_with_torch(out, "vgt", feeds, ref, {"batch": batch, "frames": frames})


@pytest.mark.parametrize("frames", [1, 3, 9])
def test_vae_decoder_onnxruntime_matches_pytorch(ski_engines, torch_side, frames):
    out, _, _ = ski_engines
    _, components, _, _ = torch_side
    latent = np.random.default_rng(200 + frames).standard_normal((frames, 4, LATENT, LATENT)).astype(np.float32)
    with torch.no_grad():
        ref = components.codec.decode(torch.from_numpy(latent))
    compare_with_torch(out, "vae_decoder", {"latent": latent}, ref,
                       {"frames": frames, "image_height": SIZE, "image_width": SIZE})


@pytest.mark.parametrize("batch", [1, 2])
def test_text_encoder_onnxruntime_matches_pytorch(ski_engines, torch_side, batch):
    out, _, _ = ski_engines
    _, components, _, _ = torch_side
    ids = components.tokenizer([PROMPT, ""][:batch], padding="max_length", max_length=SEQ,
                               return_tensors="np").input_ids.astype(np.int64)
    with torch.no_grad():
        ref = components.text_encoder(torch.from_numpy(ids))[0]
    compare_with_torch(out, "text_encoder", {"input_ids": ids}, ref, {"batch": batch})


def test_validation_report_passed_at_traced_and_other_shapes(ski_engines):
    out, _, _ = ski_engines
    report = json.loads((out / "validation.json").read_text())
    assert sorted(report["networks"]) == sorted([*NETWORKS, "unet.ort"])  # + the fused-attention flavour
    for name, result in report["networks"].items():
        assert result["passed"] is True, name
        traced = [c for c in result["checks"] if c["traced"]]
        others = [c for c in result["checks"] if not c["traced"]]
        assert traced and others, name
        assert all(c["passed"] and c["finite"] and c["max_abs"] <= result["tolerance"]["max_abs"]
                   for c in result["checks"]), name
        assert all(c["shape"] != traced[0]["shape"] for c in others), name
    unet_frames = {c["shape"]["frames"] for c in report["networks"]["unet"]["checks"]}
    assert len(unet_frames) >= 2


# --------------------------------------------------------------------------- manifest


TOP_LEVEL = {"format": str, "format_version": int, "networks": dict, "scheduler": dict,
             "vae_scaling_factor": float, "latent_channels": int, "vae_downsample": int, "tokenizer": dict,
             "start_latent": (str, type(None)), "prompt": str, "checkpoint_sha256": str, "files": dict,
             "versions": dict}
PER_NETWORK = {"onnx": str, "engine": (str, type(None)), "inputs": list, "outputs": list, "profile": dict,
               "tolerance": dict}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def test_manifest_has_every_documented_key_with_its_type(ski_engines, ski_run):
    out, returned, _ = ski_engines
    manifest = read_manifest(out)
    assert manifest == json.loads(json.dumps(returned))  # the file is what export_run returned
    assert manifest["format"] == "apla-engines" and manifest["format_version"] == 1
    for key, kind in TOP_LEVEL.items():
        assert key in manifest, key
        assert isinstance(manifest[key], kind) and not isinstance(manifest[key], bool), key
    assert manifest["prompt"] == PROMPT
    assert (manifest["latent_channels"], manifest["vae_downsample"]) == (4, SIZE // LATENT)
    assert manifest["vae_scaling_factor"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["checkpoint_sha256"])
    assert {"torch", "onnx", "onnxruntime", "opset"} <= set(manifest["versions"])
    assert all(isinstance(v, str) for v in manifest["versions"].values())
    for name, entry in manifest["networks"].items():
        for key, kind in PER_NETWORK.items():
            assert isinstance(entry[key], kind), (name, key)
        assert entry["engine"] is None  # --backend onnx
        assert isinstance(entry["tolerance"]["max_abs"], float) and 0 < entry["tolerance"]["max_abs"] <= 1e-3
        for tensor in entry["inputs"] + entry["outputs"]:
            assert set(tensor) == {"name", "dtype", "dims"} and tensor["dtype"] in ONNX_DTYPES
            assert all(isinstance(d, str) or (_is_int(d) and d >= 1) for d in tensor["dims"]), tensor


def test_profile_ranges_cover_every_named_input_dim(ski_engines):
    from export.trt import profile_shapes

    out, _, _ = ski_engines
    manifest = read_manifest(out)
    for name, entry in manifest["networks"].items():
        named = {d for t in entry["inputs"] for d in t["dims"] if isinstance(d, str)}
        assert named == set(entry["profile"]), name
        for dim, rng in entry["profile"].items():
            assert len(rng) == 3 and all(_is_int(v) for v in rng), (name, dim)
            assert 1 <= rng[0] <= rng[1] <= rng[2], (name, dim, rng)
        profile_shapes(entry["inputs"], entry["profile"])  # what TensorRT's profiles are built from
    unet = manifest["networks"]["unet"]["profile"]
    assert unet["frames"] == [1, N_FRAMES, 24] and unet["batch"] == [1, 2, 2]
    assert unet["height"] == unet["width"] == [LATENT] * 3
    assert manifest["networks"]["vgt"]["profile"]["frames"][2] <= manifest["config"]["vgt"]["max_frames"]


def test_scheduler_loads_and_equals_the_runs(ski_engines, torch_side):
    out, _, _ = ski_engines
    scheduler = SchedulerConfig.from_dict(read_manifest(out)["scheduler"])
    assert scheduler == torch_side[1].scheduler


def test_tokenizer_folder_loads_offline_and_tokenizes_like_the_run(ski_engines, torch_side):
    from transformers import CLIPTokenizer

    out, _, _ = ski_engines
    manifest = read_manifest(out)
    folder = out / manifest["tokenizer"]["dir"]
    assert folder.is_dir()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.model_max_length == manifest["tokenizer"]["model_max_length"] == SEQ
    run_tokenizer = torch_side[1].tokenizer
    for text in (PROMPT, ""):
        assert tokenizer(text, padding="max_length", max_length=SEQ).input_ids == \
            run_tokenizer(text, padding="max_length", max_length=SEQ).input_ids


def test_start_latent_is_the_runs_inverted_latent(ski_engines, ski_run):
    out, _, _ = ski_engines
    manifest = read_manifest(out)
    assert manifest["start_latent"] == "start_latent.npy"
    latent = np.load(out / manifest["start_latent"], allow_pickle=False)
    assert latent.shape == (1, 4, N_FRAMES, LATENT, LATENT) and latent.dtype == np.float32
    assert np.isfinite(latent).all()
    np.testing.assert_array_equal(latent, np.load(ski_run / "start_latent.npy"))


def test_files_hash_every_file_but_the_manifest(ski_engines):
    out, _, _ = ski_engines
    files = read_manifest(out)["files"]
    on_disk = snapshot(out)
    del on_disk["manifest.json"]
    assert files == on_disk
    assert {"validation.json", "start_latent.npy", "unet.onnx"} <= set(files)
    assert any(name.startswith("tokenizer/") for name in files)


def test_checkpoint_hash_is_the_latest_checkpoints(ski_engines, ski_run):
    from apla_train.checkpoint import list_checkpoints

    out, _, _ = ski_engines
    manifest = read_manifest(out)
    (_, first), (_, last) = list_checkpoints(ski_run)
    assert manifest["checkpoint"] == last.name == "step-00000002"
    assert manifest["checkpoint_sha256"] == sha256(last / "model.safetensors")
    assert manifest["checkpoint_sha256"] != sha256(first / "model.safetensors")


# --------------------------------------------------------------------------- VGT variants


def test_vgt_none_run_exports_without_a_vgt(onnx_force_export, novgt_run):
    result, out, _ = onnx_force_export
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert list(manifest["networks"]) == [n for n in NETWORKS if n != "vgt"]
    assert manifest["config"]["vgt"]["kind"] == "none"
    assert not (out / "vgt.onnx").exists()
    validation = json.loads((out / "validation.json").read_text())
    assert "vgt" not in validation["networks"]
    assert all(r["passed"] for r in validation["networks"].values())


def test_vgt_source_run_exports_a_vgt_with_a_source_input(auto_default_out_export, source_run):
    result, cwd = auto_default_out_export
    assert result.exit_code == 0, result.output
    out = cwd / "engines" / source_run.name
    manifest = read_manifest(out)
    assert manifest["vgt_source"] is True
    vgt = manifest["networks"]["vgt"]
    assert [t["name"] for t in vgt["inputs"]] == ["sample", "timestep", "source"]
    assert vgt["inputs"][2]["dims"] == vgt["inputs"][0]["dims"] == ["batch", 4, "frames", LATENT, LATENT]
    # ORT vs PyTorch at a frame count other than the traced one, with the source input
    _, _, torch_vgt, _ = pipeline.load_run(source_run)
    rng = np.random.default_rng(7)
    feeds = {"sample": rng.standard_normal((2, 4, 6, LATENT, LATENT)).astype(np.float32),
             "timestep": np.array([999, 10], dtype=np.int64),
             "source": rng.standard_normal((2, 4, 6, LATENT, LATENT)).astype(np.float32)}
    with torch.no_grad():
        ref = torch_vgt(*(torch.from_numpy(v) for v in feeds.values()))
    compare_with_torch(out, "vgt", feeds, ref, {"batch": 2, "frames": 6})
    # the clean latent that VGT reads travels with the engine folder, and the runtime feeds it
    from apla_rt.pipeline import generate
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample

    assert manifest["source_latent"] == "source_latent.npy"
    source = np.load(out / "source_latent.npy")
    start = np.load(out / "start_latent.npy")
    assert source.shape == start.shape and not np.array_equal(source, start)
    result = generate(out, "a man is skiing", steps=2, guidance=3.0)
    _, components, _, _ = pipeline.load_run(source_run)
    text = torch.cat([encode_prompts(components, [""]), encode_prompts(components, ["a man is skiing"])])
    want = ddim_sample(components.unet, torch_vgt, torch.from_numpy(start), text, components.scheduler,
                       2, 3.0, source=torch.from_numpy(source))
    assert np.abs(result.latents - want.numpy()).max() < 1e-3


# --------------------------------------------------------------------------- CLI: backends, --out


def test_cli_backend_onnx_builds_no_engines_and_prints_no_tensorrt_line(onnx_force_export):
    result, out, _ = onnx_force_export
    assert result.exit_code == 0, result.output
    assert "TensorRT" not in result.output and "engine" not in result.stderr.replace("engine folder", "")
    assert stderr_lines(result)[-1] == f"engine folder written to {out}"
    assert not list(out.glob("*.plan")) and not (out / "timing.cache").exists()
    assert all(e["engine"] is None for e in read_manifest(out)["networks"].values())


def test_cli_backend_auto_without_tensorrt_says_so_in_one_line(auto_default_out_export):
    ok, reason = trt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are available here: --backend auto builds engines")
    result, _ = auto_default_out_export
    assert result.exit_code == 0, result.output
    (line,) = [l for l in stderr_lines(result) if "TensorRT" in l]
    assert line.startswith("TensorRT engines were not built: ") and reason in line
    assert "Traceback" not in result.output


def test_cli_default_out_is_engines_slash_run_name(auto_default_out_export, source_run):
    result, cwd = auto_default_out_export
    assert result.exit_code == 0, result.output
    assert [p.name for p in (cwd / "engines").iterdir() if not p.name.startswith(".")] == [source_run.name]
    manifest = read_manifest(cwd / "engines" / source_run.name)
    assert manifest["name"] == manifest["run"] == source_run.name
    assert stderr_lines(result)[-1] == f"engine folder written to {Path('engines') / source_run.name}"


def test_cli_backend_trt_without_tensorrt_fails_naming_why(ski_run, tmp_path):
    ok, reason = trt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are available here")
    out = tmp_path / "engines"
    result = invoke("--run", ski_run, "--out", out, "--backend", "trt", "--fp16")
    line = assert_one_line_error(result, reason)
    assert line == f"error: cannot build TensorRT engines: {reason}"
    assert not out.exists() and not leftovers(out)


# --------------------------------------------------------------------------- CLI: bad input


def _not_a_run(root: Path, _run: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _no_checkpoint(root: Path, run: Path) -> Path:
    (root / "fresh").mkdir()
    shutil.copy(run / "config.json", root / "fresh" / "config.json")
    return root / "fresh"


def _bad_config(root: Path, _run: Path) -> Path:
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"prompt": ')
    return root / "broken"


BAD_INPUT = [
    # (id, make the --run folder, extra args, text the one error line must contain)
    ("missing-run", lambda root, run: root / "nowhere", [], "is not a training run folder"),
    ("not-a-run", _not_a_run, [], "is not a training run folder"),
    ("no-checkpoint", _no_checkpoint, [], "has no complete checkpoint"),
    ("damaged-config", _bad_config, [], "cannot read config.json"),
    ("frames-min-above-opt", lambda root, run: run, ["--frames-min", "5", "--frames-opt", "2"],
     "frame profile must satisfy 1 <= min <= opt <= max (got 5, 2, 24)"),
    ("frames-max-above-vgt", lambda root, run: run, ["--frames-max", "100"], "exceeds the VGT's 64 frame"),
    ("frames-zero", lambda root, run: run, ["--frames-min", "0"], "--frames-min must be between 1 and 1024"),
    ("threads-zero", lambda root, run: run, ["--threads", "0"], "--threads must be between 1 and 1024"),
]


@pytest.mark.parametrize("make_run, extra, needle", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_cli_bad_input_is_a_one_line_error_and_writes_nothing(ski_run, tmp_path, make_run, extra, needle):
    run = make_run(tmp_path, ski_run)
    before = snapshot(ski_run)
    out = tmp_path / "out" / "engines"
    result = invoke("--run", run, "--out", out, "--backend", "onnx", *extra)
    assert_one_line_error(result, needle)
    assert not out.exists()
    assert snapshot(ski_run) == before


def test_out_equal_to_the_run_is_refused_even_with_force(ski_run):
    before = snapshot(ski_run)
    assert_one_line_error(invoke("--run", ski_run, "--out", ski_run, "--backend", "onnx", "--force"),
                          "would replace the run folder")
    assert_one_line_error(invoke("--run", ski_run, "--out", ski_run.parent, "--backend", "onnx", "--force"),
                          "would replace the run folder")
    assert snapshot(ski_run) == before


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("apla-export")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "export.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([*cmd, "--run", "runs/nowhere", "--backend", "onnx"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --run runs/nowhere is not a training run folder "
                                                "(no config.json)"]
    assert proc.stdout == "" and not (tmp_path / "engines" / "nowhere").exists()


# --------------------------------------------------------------------------- atomic folder, --force, lock


def test_existing_folder_without_force_fails_and_stays_byte_identical(ski_engines, ski_run):
    out, _, _ = ski_engines
    before = snapshot(out)
    result = invoke("--run", ski_run, "--out", out, "--backend", "onnx")
    assert_one_line_error(result, "already exists; pass --force")
    assert snapshot(out) == before


def test_force_replaces_the_existing_folder(onnx_force_export, novgt_run):
    result, out, before = onnx_force_export
    assert result.exit_code == 0, result.output
    assert "vgt.onnx" in before and not (out / "vgt.onnx").exists()
    manifest = read_manifest(out)
    assert manifest["run"] == novgt_run.name
    assert manifest["checkpoint_sha256"] == sha256(novgt_run / "checkpoints" / manifest["checkpoint"]
                                                   / "model.safetensors")
    after = snapshot(out)
    del after["manifest.json"]
    assert manifest["files"] == after
    assert not leftovers(out)


def _failing_validation(fail: str):
    def validate(spec, onnx_path, threads=None, shapes=None):
        ok = spec.name != fail
        check = {"shape": dict(spec.validate_at[0]), "traced": True, "output": spec.outputs[0].name,
                 "max_abs": 0.0 if ok else 1.0, "mean_abs": 0.0, "finite": True, "passed": ok}
        return {"network": spec.name, "tolerance": spec.tolerance, "checks": [check], "passed": ok}
    return validate


def test_failed_validation_keeps_the_previous_folder(ski_engines, ski_run, tmp_path, monkeypatch):
    out = tmp_path / "ski"
    shutil.copytree(ski_engines[0], out)
    before = snapshot(out)
    real_specs = pipeline.network_specs
    # two networks keep it quick: the text encoder passes, the VAE decoder fails
    monkeypatch.setattr(pipeline, "network_specs", lambda *a, **k: [s for s in real_specs(*a, **k)
                                                                    if s.name in ("text_encoder", "vae_decoder")])
    monkeypatch.setattr(pipeline, "validate_network", _failing_validation("vae_decoder"))
    with pytest.raises(IntegrityError, match=r"validation failed for vae_decoder \("):
        pipeline.export_run(ski_run, out, backend="onnx", force=True, log=lambda _m: None)
    assert snapshot(out) == before
    assert not leftovers(out)


def test_exception_midway_keeps_the_previous_folder(ski_engines, ski_run, tmp_path, monkeypatch):
    out = tmp_path / "ski"
    shutil.copytree(ski_engines[0], out)
    before = snapshot(out)
    real, calls = pipeline.export_onnx, []

    def export_then_fail(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:  # the first network's ONNX is already in the new folder
            raise RuntimeError("simulated exporter crash")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline, "export_onnx", export_then_fail)
    with pytest.raises(RuntimeError, match="simulated exporter crash"):
        pipeline.export_run(ski_run, out, backend="onnx", force=True, log=lambda _m: None)
    assert calls == NETWORKS[:2]
    assert snapshot(out) == before
    assert not leftovers(out)


def test_interrupted_export_writes_nothing(ski_run, tmp_path, monkeypatch):
    out = tmp_path / "new" / "ski"

    def interrupt(spec, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_onnx", interrupt)
    result = invoke("--run", ski_run, "--out", out, "--backend", "onnx")
    assert result.exit_code == 130
    assert stderr_lines(result) == ["interrupted: no engine folder was changed"]
    assert not out.exists() and not leftovers(out)


def test_concurrent_export_to_the_same_folder_refuses(ski_run, tmp_path):
    out = tmp_path / "ski"
    with pipeline.export_lock(out):
        result = invoke("--run", ski_run, "--out", out, "--backend", "onnx")
    assert_one_line_error(result, f"another apla-export is writing {out}")
    assert not out.exists() and not leftovers(out)
    with pipeline.export_lock(out):  # released: the next export may take it
        pass
    with pipeline.export_lock(out), pytest.raises(AplaError, match="another apla-export"):
        with pipeline.export_lock(out):
            pass


# --------------------------------------------------------------------------- dynamo exporter


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


# --------------------------------------------------------------------------- TensorRT (GPU only)


@pytest.mark.tensorrt
def test_backend_trt_fp16_builds_checked_engines(ski_run, tmp_path):
    ok, reason = trt_available()
    if not ok:
        pytest.skip(reason)
    out = tmp_path / "engines"
    result = invoke("--run", ski_run, "--out", out, "--backend", "trt", "--fp16")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert (out / "timing.cache").is_file() and "tensorrt" in manifest["versions"]
    for name, entry in manifest["networks"].items():
        assert entry["engine"] == f"{name}.plan" and (out / entry["engine"]).is_file()
        assert manifest["files"][entry["engine"]] == sha256(out / entry["engine"])
        assert entry["trt_check"]["passed"] is True


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
    take it: tensors go to <name>.onnx.data, the manifest lists and hashes them, onnx.checker
    and ONNX Runtime load them, and the runtime samples from the folder."""
    from apla_rt.pipeline import generate

    from export import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 4096)
    out = tmp_path / "engines"
    manifest = pipeline.export_run(ski_run, out, backend="onnx", log=lambda _: None)
    unet = manifest["networks"]["unet"]
    assert sorted(unet["external_data"]) == ["unet.onnx.data", "unet.ort.onnx.data"]
    for name in ("unet.onnx", "unet.ort.onnx"):
        assert (out / (name + ".data")).stat().st_size > (out / name).stat().st_size
        assert manifest["files"][name + ".data"] == hashlib.sha256((out / (name + ".data")).read_bytes()).hexdigest()
    result = generate(out, "a man is skiing", steps=2)
    assert result.frames.shape[0] == json.loads((ski_run / "config.json").read_text())["data"]["n_frames"]


def test_portable_unet_is_validated_at_small_shapes_when_full_ones_would_not_fit(torch_side):
    """At SD's 64x64 latents the decomposed attn1 scores of batch 2 x 24 frames need ~51 GB:
    the portable UNet is then checked at 2-3 frames; the tiny run keeps the full shapes."""
    from export.networks import _small_unet_shapes

    components = torch_side[1]
    assert _small_unet_shapes(components, 8, 1, 24) is None
    small = _small_unet_shapes(components, 64, 1, 24)
    assert small == [{"batch": 1, "frames": 2, "height": 64, "width": 64},
                     {"batch": 2, "frames": 3, "height": 64, "width": 64}]
