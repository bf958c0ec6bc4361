"""The TensorRT build's validation plan (export/trt_plan.py) at Stable Diffusion 1.5 sizes,
512 px x 24 frames, computed from the export's own network contracts over an SD-1.5-shaped
UNet on torch's meta device (no weights, nothing large allocated); and the runtime TensorRT
runner's engine I/O check (apla_rt/backends/trt.py) without TensorRT."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

from apla_rt.errors import IntegrityError
from apla_rt.folder.contract import NetworkSpec, TensorSpec
from apla_rt.backends.trt import EngineTensor, check_engine_io
from export import trt_plan as P

ROOT = Path(__file__).resolve().parents[1]
SD_SHAPED = ROOT / "benchmarks" / "make_sd_shaped.py"


def _sd_shaped():
    if not SD_SHAPED.is_file():  # tracked in git: missing only from a broken checkout
        pytest.fail(f"{SD_SHAPED.relative_to(ROOT)} is missing from this checkout", pytrace=False)
    spec = importlib.util.spec_from_file_location("make_sd_shaped", SD_SHAPED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd_entries():
    """Manifest entries as apla-export writes them for an SD 1.5 run at 512 px, 24 frames
    (default frame profile 1..48, opt 24), from ``export.networks.network_specs``."""
    import torch
    from diffusers import UNet2DConditionModel

    from apla_rt.sampling.schedule import SchedulerConfig
    from apla_train.config import AplaConfig
    from apla_train.unet3d import UNet3DConditionModel
    from export.networks import network_specs
    from export.pipeline import frame_profile

    sd = _sd_shaped()
    with torch.device("meta"):
        unet = UNet3DConditionModel(UNet2DConditionModel(**sd.SD15_UNET))
    assert next(unet.parameters()).device.type == "meta"
    cfg = AplaConfig()
    cfg.data.size, cfg.data.n_frames, cfg.vgt.kind = 512, 24, "none"
    ns = types.SimpleNamespace
    components = ns(codec=ns(latent_channels=4, downsample=8, scaling_factor=0.18215), unet=unet,
                    tokenizer=ns(model_max_length=77),
                    text_encoder=ns(config=ns(hidden_size=768, vocab_size=49408)),
                    scheduler=SchedulerConfig())
    entries = {}
    for spec in network_specs(components, None, cfg, frame_profile(cfg, None, None, None)):
        entries[spec.name] = {"onnx": f"{spec.name}.onnx", "inputs": [t.to_dict() for t in spec.inputs],
                              "profile": spec.profile}
        if spec.ort_module is not None:
            entries[spec.name]["onnx_ort"] = f"{spec.name}.ort.onnx"
    return entries


def test_sd15_512px_24_frames_unet_plan(sd_entries):
    unet = sd_entries["unet"]
    assert unet["profile"]["batch"] == [1, 2, 2]  # inversion (1) and the guidance pair (2)
    plan = P.validation_plan("unet", unet)
    assert plan["reference"] == "unet.ort.onnx" and plan["fused_reference"] is True
    assert [c["which"] for c in plan["checks"]] == ["min", "opt"] and plan["skipped"] == ["max"]
    assert plan["checks"][0]["shapes"]["sample"] == (1, 4, 1, 64, 64)
    assert plan["checks"][1]["shapes"]["sample"] == (2, 4, 24, 64, 64)
    assert plan["checks"][1]["shapes"]["encoder_hidden_states"] == (2, 77, 768)
    assert all(c["reference_score_bytes"] == 0 for c in plan["checks"])


def test_portable_reference_at_sd_size_is_refused_and_why(sd_entries):
    """The decomposed-attention graph would need 48 GiB for one fp32 score tensor at
    512 px x 24 frames x batch 2 (and as much again for its softmax): the plan never uses it
    (nor the max shapes) there."""
    at_opt = (2, 4, 24, 64, 64)
    assert P.self_attention_score_bytes(at_opt) == 2 * 24 * 8 * 4096 * 8192 * 4 == 48 * 2**30
    assert P.self_attention_score_bytes((2, 4, 48, 64, 64)) == 96 * 2**30  # the profile max
    portable = {k: v for k, v in sd_entries["unet"].items() if k != "onnx_ort"}
    with pytest.raises(ValueError, match="GiB for one attention score tensor"):
        P.validation_plan("unet", portable)


def test_vae_profiles_stop_at_the_decode_chunk(sd_entries):
    from apla_rt.engine import DECODE_CHUNK

    for name, latent_input in (("vae_decoder", "latent"), ("vae_encoder", "image")):
        entry = sd_entries[name]
        assert entry["profile"]["frames"] == [1, DECODE_CHUNK, DECODE_CHUNK]
        plan = P.validation_plan(name, entry)
        assert plan["reference"] == f"{name}.onnx" and not plan["fused_reference"]
        assert plan["checks"][1]["shapes"][latent_input][0] == DECODE_CHUNK
    assert P.validation_plan("vae_decoder", sd_entries["vae_decoder"])["checks"][1]["shapes"]["latent"] \
        == (8, 4, 64, 64)
    assert P.validation_plan("vae_encoder", sd_entries["vae_encoder"])["checks"][1]["shapes"]["image"] \
        == (8, 3, 512, 512)
    text = P.validation_plan("text_encoder", sd_entries["text_encoder"])
    assert [c["shapes"]["input_ids"] for c in text["checks"]] == [(1, 77), (2, 77)]


def test_small_portable_unet_is_still_its_own_reference():
    """Tiny sizes: a portable-only UNet is accepted, its score bytes are counted."""
    entry = {"onnx": "unet.onnx", "inputs": [
        {"name": "sample", "dtype": "float32", "dims": ["batch", 4, "frames", 8, 8]},
        {"name": "timestep", "dtype": "int64", "dims": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "dims": ["batch", 77, 32]}],
        "profile": {"batch": [1, 2, 2], "frames": [1, 4, 8]}}
    plan = P.validation_plan("unet", entry)
    assert plan["reference"] == "unet.onnx"
    assert plan["checks"][1]["reference_score_bytes"] == 2 * 4 * 8 * 64 * 128 * 4


# --------------------------------------------------------------------------- engine I/O check


def _unet_spec() -> NetworkSpec:
    f32, i64 = np.dtype("float32"), np.dtype("int64")
    latent = ("batch", 4, "frames", "height", "width")
    return NetworkSpec("unet", Path("unet.onnx"), Path("unet.plan"), (),
                       (TensorSpec("sample", f32, latent), TensorSpec("timestep", i64, ("batch",)),
                        TensorSpec("encoder_hidden_states", f32, ("batch", 77, 768))),
                       (TensorSpec("noise_pred", f32, latent),),
                       {"batch": (1, 2, 2), "frames": (1, 8, 24), "height": (64, 64, 64), "width": (64, 64, 64)})


def _engine(**changes):
    io = {"sample": EngineTensor("input", np.dtype("float16"), (-1, 4, -1, 64, 64)),
          "timestep": EngineTensor("input", np.dtype("int32"), (-1,)),
          "encoder_hidden_states": EngineTensor("input", np.dtype("float32"), (-1, 77, 768)),
          "noise_pred": EngineTensor("output", np.dtype("float32"), (-1, 4, -1, 64, 64))}
    io.update(changes)
    return {k: v for k, v in io.items() if v is not None}


def test_engine_io_check_accepts_same_kinds_of_dtypes():
    check_engine_io(_unet_spec(), _engine(), "unet.plan")


@pytest.mark.parametrize("changes, fragment", [
    ({"timestep": None}, "inputs ['encoder_hidden_states', 'sample']"),
    ({"noise_pred": EngineTensor("input", np.dtype("float32"), (-1, 4, -1, 64, 64))},
     "inputs ['encoder_hidden_states', 'noise_pred', 'sample', 'timestep']"),
    ({"timestep": EngineTensor("input", np.dtype("float32"), (-1,))}, "'timestep' is float32"),
    ({"encoder_hidden_states": EngineTensor("input", np.dtype("float32"), (-1, 77, 1024))}, "[-1, 77, 1024]"),
    ({"sample": EngineTensor("input", np.dtype("float16"), (-1, 4, -1, 64))}, "'sample'"),
])
def test_engine_io_check_refuses_another_network(changes, fragment):
    with pytest.raises(IntegrityError) as err:
        check_engine_io(_unet_spec(), _engine(**changes), "unet.plan")
    assert fragment in str(err.value) and "\n" not in str(err.value)
