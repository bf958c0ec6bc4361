"""Helpers for the apla-export tests (tests/test_export_*.py): the tiny runs' geometry, the ONNX
contract of docs/architecture.md instantiated for them, training a tiny run, invoking the CLI,
snapshots of folders, and running an exported network in ONNX Runtime against PyTorch.

The session's runs and exports themselves are fixtures in conftest.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from click.testing import CliRunner, Result
from conftest import clip_path

from export.cli import main as export_cli

PROMPT = "a man is skiing"
N_FRAMES, SIZE = 4, 32  # 8x8 latents with the tiny preset's 4-pixel patches
LATENT, HIDDEN, SEQ = 8, 32, 77  # latent side, tiny text encoder width, tokenizer length
# a folder without the DeepCache graphs (apla-export --no-cache-graphs, or exported before them)
BASE_NETWORKS = ["text_encoder", "unet", "vgt", "vae_decoder", "vae_encoder"]
CACHE_NETWORKS = ["unet_feature", "unet_shallow"]
NETWORKS = ["text_encoder", "unet", *CACHE_NETWORKS, "vgt", "vae_decoder", "vae_encoder"]
FEATURE = 64  # channels of the tiny UNet's feature entering its last up block (branch 0)

# The ONNX contract of docs/architecture.md, instantiated for the tiny runs.
CONTRACT = {
    "text_encoder": ({"input_ids": ("int64", ["batch", SEQ])},
                     {"last_hidden_state": ("float32", ["batch", SEQ, HIDDEN])}),
    "unet": ({"sample": ("float32", ["batch", 4, "frames", "height", "width"]),
              "timestep": ("int64", ["batch"]),
              "encoder_hidden_states": ("float32", ["batch", SEQ, HIDDEN])},
             {"noise_pred": ("float32", ["batch", 4, "frames", "height", "width"])}),
    "unet_feature": ({"sample": ("float32", ["batch", 4, "frames", "height", "width"]),
                      "timestep": ("int64", ["batch"]),
                      "encoder_hidden_states": ("float32", ["batch", SEQ, HIDDEN])},
                     {"noise_pred": ("float32", ["batch", 4, "frames", "height", "width"]),
                      "feature": ("float32", ["batch", FEATURE, "frames", "height", "width"])}),
    "unet_shallow": ({"sample": ("float32", ["batch", 4, "frames", "height", "width"]),
                      "timestep": ("int64", ["batch"]),
                      "encoder_hidden_states": ("float32", ["batch", SEQ, HIDDEN]),
                      "feature": ("float32", ["batch", FEATURE, "frames", "height", "width"])},
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
