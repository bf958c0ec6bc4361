"""The runtime's start-up integrity checks (issue 10): a runner hashes exactly the files its
session reads, in a thread while ONNX Runtime loads them, and is refused (never handed out)
when one differs from the manifest; a file no session opens is left to ``info --verify``."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import pytest
from rt_fakes import rehash

from apla_rt.folder import manifest as manifest_mod
from apla_rt.errors import IntegrityError
from apla_rt.folder.manifest import Manifest
from apla_rt.backends.runners import open_runner


@pytest.fixture
def two_flavours(engine_copy):
    """The fake folder with a second UNet graph as ``onnx_ort`` (what the CPU runner opens)
    whose weights live in an external-data file, as an SD-sized export's do."""
    model = onnx.load(str(engine_copy / "unet.onnx"))
    # a weight large enough for the external file: noise_pred + sum(zeros(1024))
    graph = model.graph
    last = [n for n in graph.node if "noise_pred" in n.output][0]
    last.output[list(last.output).index("noise_pred")] = "noise_pred_raw"
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1024, np.float32), "weight"))
    graph.node.extend([onnx.helper.make_node("ReduceSum", ["weight"], ["weight_sum"], keepdims=0),
                       onnx.helper.make_node("Add", ["noise_pred_raw", "weight_sum"], ["noise_pred"])])
    onnx.save(model, str(engine_copy / "unet.ort.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="unet.onnx.data", size_threshold=100)
    data = json.loads((engine_copy / "manifest.json").read_text())
    data["networks"]["unet"].update(onnx_ort="unet.ort.onnx", external_data=["unet.onnx.data"])
    rehash(engine_copy, data)
    return engine_copy


def test_runner_hashes_only_what_its_session_reads_in_a_thread(two_flavours, monkeypatch):
    hashed = []
    real = manifest_mod.sha256_file

    def record(path):
        hashed.append((path.name, threading.current_thread().name))
        return real(path)

    monkeypatch.setattr(manifest_mod, "sha256_file", record)
    m = Manifest.open(two_flavours)
    runner = open_runner(m, "unet", "ort", threads=1)
    assert sorted(hashed) == [("unet.onnx.data", "apla-verify"), ("unet.ort.onnx", "apla-verify")]
    assert runner.session.get_inputs() and runner.spec.name == "unet"
    # the portable graph was not opened, hence not hashed; a full verify reads it too
    hashed.clear()
    m.verify()
    assert ("unet.onnx", "MainThread") in hashed and ("unet.ort.onnx", "MainThread") not in hashed


def test_a_file_it_does_not_open_is_left_to_verify(two_flavours):
    blob = bytearray((two_flavours / "unet.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (two_flavours / "unet.onnx").write_bytes(bytes(blob))
    open_runner(Manifest.open(two_flavours), "unet", "ort", threads=1)  # opens unet.ort.onnx only
    with pytest.raises(IntegrityError, match=r"unet\.onnx does not match its sha256"):
        Manifest.open(two_flavours).verify()


@pytest.mark.parametrize("victim", ["unet.ort.onnx", "unet.onnx.data"])
def test_a_changed_file_it_opens_is_refused_after_loading(two_flavours, victim):
    """Still loadable, but not the exported bytes (a graph with an edited doc string, or a
    weight with one bit flipped): ONNX Runtime builds the session, the digest computed
    meanwhile differs, and the runner is refused before any output."""
    if victim == "unet.ort.onnx":
        model = onnx.load(str(two_flavours / victim), load_external_data=False)
        model.graph.doc_string = "edited"
        onnx.save(model, str(two_flavours / victim))
    else:
        blob = bytearray((two_flavours / victim).read_bytes())
        blob[len(blob) // 2] ^= 0x01  # a bit of the all-zero weight
        (two_flavours / victim).write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=victim.replace(".", r"\.") + " does not match its sha256"):
        open_runner(Manifest.open(two_flavours), "unet", "ort", threads=1)
