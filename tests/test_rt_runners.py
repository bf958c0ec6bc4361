"""apla_rt's runners and backends on the fake engine folder: ONNX Runtime against the NumPy
twins end to end, the CUDA I/O-binding path, the CPU guidance halves run side by side,
choosing between ONNX Runtime and TensorRT, and (marker ``tensorrt``) TensorRT against
ONNX Runtime."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from rt_fakes import (C, HIDDEN, LAT, PATCH, SEQ, FakeNets, edit_manifest, make_engine_folder, numpy_engine,
                      rehash, settings)

from apla_rt import Latent
from apla_rt.folder.latents import folder_start_timestep
from apla_rt.errors import BackendUnavailable
from apla_rt.folder.manifest import Manifest
from apla_rt.engine import Engine
from rt_run import generate
from apla_rt.backends.placement import select_backend


def test_ort_cuda_path_keeps_constants_on_device(fake_engine, monkeypatch):
    """The CUDA branch (I/O binding) with a stand-in binding: constants are uploaded once."""
    import onnxruntime as ort

    from apla_rt.backends.runners import OrtRunner

    m = Manifest.open(fake_engine)
    runner = OrtRunner(m.network("unet"), m.network("unet").onnx)
    uploads, session = [], runner.session

    class Binding:
        def __init__(self):
            self.inputs, self.outputs = {}, []

        def bind_ortvalue_input(self, name, value):
            self.inputs[name] = value

        def bind_cpu_input(self, name, value):
            self.inputs[name] = value

        def bind_output(self, name, device, device_id):
            assert device == "cuda"
            self.outputs.append(name)

        def copy_outputs_to_cpu(self):
            return session.run(self.outputs, self.inputs)

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            pass

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy",
                        staticmethod(lambda value, device, index: uploads.append(device) or value))
    runner.session, runner.device = Session(), "cuda"
    text = np.random.default_rng(0).standard_normal((2, SEQ, HIDDEN)).astype(np.float32)
    runner.set_constant("encoder_hidden_states", text)
    feeds = {"sample": np.ones((2, C, 3, LAT, LAT), np.float32), "timestep": np.array([5, 5])}
    for _ in range(3):
        out = runner.run(feeds)["noise_pred"]
    assert uploads == ["cuda"]
    np.testing.assert_allclose(out, FakeNets.unet(feeds["sample"], feeds["timestep"], text), atol=1e-6)
    runner.set_constant("encoder_hidden_states", text * 2)
    runner.run(feeds)
    assert uploads == ["cuda", "cuda"]


def test_onnx_runtime_engine_matches_numpy(fake_engine):
    """ORT runners on the ONNX graphs give the NumPy twins' results, end to end."""
    nets = FakeNets(0, vocab=600)
    twin = numpy_engine(fake_engine, nets)
    result = generate(fake_engine, "a man is skiing", steps=4, guidance=5.0, threads=1)
    text = twin.encode_text(["", "a man is skiing"])
    want = twin.sample(Latent(twin.manifest.load_start_latent(), None,
                              folder_start_timestep(twin.manifest)), text, settings(4, 5.0))
    np.testing.assert_allclose(result.latents, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(result.frames, twin.decode(want))
    assert result.backend.startswith("onnxruntime-cpu") and result.vgt
    assert result.frames.shape == (4, LAT * PATCH, LAT * PATCH, 3)
    assert result.timings.calls["unet"] == 4 and result.timings.calls["vgt"] == 4
    assert result.timings.calls["text encoder"] == 1 and result.timings.seconds["unet"] > 0


def test_cpu_guidance_halves_run_side_by_side(fake_engine, monkeypatch):
    """With 2+ CPU threads the UNet runs each guidance half as its own batch-1 call, both at
    once on the one session (single-threaded pool); the result is the batch-2 call's."""
    from apla_rt.backends import placement, runners

    monkeypatch.setattr(placement, "ort_cuda_available", lambda: False)  # the CPU path, even on a GPU
    seen: list[tuple[int, int, int]] = []
    meet = threading.Barrier(2, timeout=20)  # breaks (and fails the run) unless both halves overlap
    real = runners.OrtRunner.run

    def spy(self, feeds):
        if self.spec.name == "unet":
            seen.append((threading.get_ident(), feeds["sample"].shape[0],
                         feeds.get("encoder_hidden_states", self._constants.get(
                             "encoder_hidden_states")).shape[0]))
            if feeds["sample"].shape[0] == 1:
                meet.wait()
        return real(self, feeds)

    monkeypatch.setattr(runners.OrtRunner, "run", spy)
    one = generate(fake_engine, "a man is skiing", steps=3, guidance=5.0, threads=1, backend="ort-cpu")
    # one thread: one batch-2 call to warm up when the pipeline opens, then one per step
    assert [(b, t) for _, b, t in seen] == [(2, 2)] * 4
    seen.clear()
    with Engine.open(fake_engine, "ort", ("unet",), threads=2) as engine:
        assert engine.placement.split_guidance
        options = engine.runners["unet"].session.get_session_options()
        assert options.intra_op_num_threads == 1  # + the second caller: 2 threads in all
    two = generate(fake_engine, "a man is skiing", steps=3, guidance=5.0, threads=2, backend="ort-cpu")
    assert [(b, t) for _, b, t in seen] == [(1, 1)] * 8  # the warm-up in halves too
    assert len({tid for tid, _, _ in seen}) == 2
    np.testing.assert_allclose(two.latents, one.latents, rtol=0, atol=1e-5)
    assert np.abs(two.frames.astype(int) - one.frames).max() <= 1
    assert two.timings.calls["unet"] == 3
    for kwargs in ({"threads": None}, {"threads": 2, "guidance_batch": False}):
        with Engine.open(fake_engine, "ort", ("unet",), **kwargs) as engine:
            assert not engine.placement.split_guidance, kwargs  # ORT's own threads / inversion (batch 1)
    with Engine.open(fake_engine, "ort", ("unet",), threads=2, guidance_batch=False) as engine:
        assert engine.runners["unet"].session.get_session_options().intra_op_num_threads == 2


def test_a_failing_guidance_half_reaches_the_caller(fake_engine, monkeypatch):
    from apla_rt.backends import placement, runners

    monkeypatch.setattr(placement, "ort_cuda_available", lambda: False)
    real = runners.OrtRunner.run

    def failing(self, feeds):
        if self.spec.name == "unet" and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the helper's half failed")
        return real(self, feeds)

    monkeypatch.setattr(runners.OrtRunner, "run", failing)
    with Engine.open(fake_engine, "ort", threads=2) as engine:
        text = engine.encode_text(["", "a man is skiing"])
        with pytest.raises(RuntimeError, match="helper's half"):
            engine.sample(Latent(engine.manifest.load_start_latent()), text, settings(2, 5.0))
        helper = engine.pool._halves
    assert helper is not None and helper._shutdown  # closed with the engine: no thread left behind


# --------------------------------------------------------------------------- backends


def test_backend_selection(engine_copy):
    m = Manifest.open(engine_copy)
    nets = tuple(m.networks)
    assert select_backend("ort", m, nets)[0] == "ort"
    assert select_backend("auto", m, nets) == ("ort", "no TensorRT engine for text_encoder, unet, "
                                               "vgt, vae_decoder, vae_encoder")
    with pytest.raises(BackendUnavailable, match="--backend trt: the engine folder has no TensorRT engine"):
        select_backend("trt", m, nets)
    # a folder with (dummy) engines: auto falls back to ONNX Runtime without TensorRT
    for name in nets:
        (engine_copy / f"{name}.plan").write_bytes(b"not a real engine")
    edit_manifest(engine_copy, lambda d: [d["networks"][n].update(engine=f"{n}.plan") for n in nets])
    rehash(engine_copy)
    m = Manifest.open(engine_copy)
    from apla_rt.backends.gpu import trt_available

    ok, why = trt_available()
    if not ok:
        assert select_backend("auto", m, nets) == ("ort", why)
        with pytest.raises(BackendUnavailable, match="--backend trt: "):
            select_backend("trt", m, nets)
        generate(engine_copy, "a man is skiing", steps=1)  # auto -> ORT, .plan files never read


@pytest.mark.tensorrt
def test_tensorrt_runner_matches_onnxruntime(tmp_path):
    from apla_rt.backends.gpu import trt_available

    ok, why = trt_available()
    if not ok:
        pytest.skip(f"TensorRT is not usable here: {why}")
    from export.trt import build_all

    folder = make_engine_folder(tmp_path / "engine")
    manifest = build_all(folder, json.loads((folder / "manifest.json").read_text()), fp16=False,
                         log=lambda m: None)
    rehash(folder, manifest)
    ort = generate(folder, "a man is skiing", steps=3, backend="ort")
    trt = generate(folder, "a man is skiing", steps=3, backend="trt")
    assert trt.backend.startswith("tensorrt")
    np.testing.assert_allclose(trt.latents, ort.latents, atol=1e-3)
