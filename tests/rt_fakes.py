"""A hand-made engine folder for the apla_rt tests: five small ONNX graphs written with
``onnx.helper``, their NumPy twins (``FakeNets``, the truth the graphs are checked against),
a CLIP-style BPE tokenizer and a manifest that lists and hashes them all; plus a NumPy
``Engine`` (``numpy_engine``) that runs the twins behind the manifest's checks.

The session's copy of the folder is the ``fake_engine`` fixture in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from apla_rt.backends.placement import Choice, Placement
from apla_rt.folder.contract import NetworkSpec
from apla_rt.folder.manifest import Manifest
from apla_rt.engine import Engine
from apla_rt.sampling.settings import SamplingSettings
from apla_rt.sampling.schedule import SchedulerConfig
from apla_train.components import byte_alphabet  # the same byte-level alphabet CLIP uses

# The fake engine's geometry: 4 latent channels, 4x4 latents, 2x2 pixels per latent cell.
C, LAT, PATCH, HIDDEN, SEQ = 4, 4, 2, 8, 77
FRAMES = (1, 4, 6)


# --------------------------------------------------------------------------- a tokenizer


MERGES = [("s", "k"), ("sk", "i"), ("n", "g</w>"), ("i", "ng</w>"), ("m", "a"), ("ma", "n</w>"),
          ("t", "h"), ("th", "e</w>"), ("ski", "ing</w>")]


def write_vocab_merges(folder: Path, merges=MERGES) -> dict[str, int]:
    """A CLIP-style vocab.json + merges.txt: the byte alphabet, with '</w>', and merges."""
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return vocab


# --------------------------------------------------------------------------- fake networks


class FakeNets:
    """NumPy versions of the fake engine's networks (also the truth for the ONNX graphs)."""

    def __init__(self, seed: int = 0, vocab: int = 600):
        self.table = np.random.default_rng(seed).standard_normal((vocab, HIDDEN)).astype(np.float32)
        rng = np.random.default_rng(seed + 1)
        self.dec_w = (rng.standard_normal((3 * PATCH * PATCH, C)) * 0.3).astype(np.float32)
        self.dec_b = (rng.standard_normal(3 * PATCH * PATCH) * 0.1).astype(np.float32)
        self.enc_w = (rng.standard_normal((C, 3 * PATCH * PATCH)) * 0.3).astype(np.float32)

    def text_encoder(self, input_ids):
        return self.table[input_ids]

    @staticmethod
    def unet(sample, timestep, encoder_hidden_states):
        b = sample.shape[0]
        m = encoder_hidden_states.mean(axis=(1, 2)).reshape(b, 1, 1, 1, 1)
        t = timestep.astype(np.float32).reshape(b, 1, 1, 1, 1) * np.float32(1e-3)
        return (sample * np.float32(0.9) + m * np.float32(2.0) + t * np.float32(0.1)
                + sample.mean(axis=2, keepdims=True) * np.float32(0.05)).astype(np.float32)

    @staticmethod
    def vgt(sample, timestep):
        b = sample.shape[0]
        t = timestep.astype(np.float32).reshape(b, 1, 1, 1, 1) * np.float32(1e-3)
        return (sample * np.float32(0.02) + t * np.float32(0.01)).astype(np.float32)

    def vae_decoder(self, latent):
        f, _, h, w = latent.shape
        y = np.einsum("oc,fchw->fohw", self.dec_w, latent) + self.dec_b[None, :, None, None]
        y = y.reshape(f, 3, PATCH, PATCH, h, w).transpose(0, 1, 4, 2, 5, 3)  # DepthToSpace, CRD
        return np.tanh(y.reshape(f, 3, h * PATCH, w * PATCH)).astype(np.float32)

    def vae_encoder(self, image):
        f, _, hh, ww = image.shape
        h, w = hh // PATCH, ww // PATCH
        x = image.reshape(f, 3, h, PATCH, w, PATCH).transpose(0, 3, 5, 1, 2, 4)  # SpaceToDepth
        x = x.reshape(f, 3 * PATCH * PATCH, h, w)
        return np.einsum("oc,fchw->fohw", self.enc_w, x).astype(np.float32)


def _onnx_models(nets: FakeNets) -> dict[str, Any]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    vi = helper.make_tensor_value_info

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    def model(nodes, inputs, outputs, inits):
        graph = helper.make_graph(nodes, "fake", inputs, outputs, initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m

    n = helper.make_node
    latent5 = ["batch", C, "frames", "height", "width"]
    five = const("five", np.array([-1, 1, 1, 1, 1], dtype=np.int64))
    models = {
        "text_encoder": model(
            [n("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
            [vi("input_ids", I64, ["batch", SEQ])], [vi("last_hidden_state", F, ["batch", SEQ, HIDDEN])],
            [const("table", nets.table)]),
        "unet": model(
            [n("ReduceMean", ["encoder_hidden_states"], ["m"], axes=[1, 2], keepdims=1),
             n("Reshape", ["m", "five"], ["m5"]),
             n("Cast", ["timestep"], ["tf"], to=F),
             n("Reshape", ["tf", "five"], ["t5"]),
             n("Mul", ["t5", "k_t"], ["t_s"]),
             n("Mul", ["t_s", "k_01"], ["t_term"]),
             n("Mul", ["sample", "k_09"], ["a"]),
             n("Mul", ["m5", "k_2"], ["b"]),
             n("ReduceMean", ["sample"], ["fm"], axes=[2], keepdims=1),
             n("Mul", ["fm", "k_005"], ["c"]),
             n("Add", ["a", "b"], ["ab"]),
             n("Add", ["ab", "t_term"], ["abt"]),
             n("Add", ["abt", "c"], ["noise_pred"])],
            [vi("sample", F, latent5), vi("timestep", I64, ["batch"]),
             vi("encoder_hidden_states", F, ["batch", SEQ, HIDDEN])],
            [vi("noise_pred", F, latent5)],
            [five, const("k_t", np.float32(1e-3)), const("k_01", np.float32(0.1)),
             const("k_09", np.float32(0.9)), const("k_2", np.float32(2.0)),
             const("k_005", np.float32(0.05))]),
        "vgt": model(
            [n("Cast", ["timestep"], ["tf"], to=F),
             n("Reshape", ["tf", "five"], ["t5"]),
             n("Mul", ["t5", "k_t"], ["t_s"]),
             n("Mul", ["t_s", "k_001"], ["t_term"]),
             n("Mul", ["sample", "k_002"], ["a"]),
             n("Add", ["a", "t_term"], ["delta"])],
            [vi("sample", F, ["batch", C, "frames", LAT, LAT]), vi("timestep", I64, ["batch"])],
            [vi("delta", F, ["batch", C, "frames", LAT, LAT])],
            [five, const("k_t", np.float32(1e-3)), const("k_001", np.float32(0.01)),
             const("k_002", np.float32(0.02))]),
        "vae_decoder": model(
            [n("Conv", ["latent", "w", "b"], ["y"]),
             n("DepthToSpace", ["y"], ["z"], blocksize=PATCH, mode="CRD"),
             n("Tanh", ["z"], ["image"])],
            [vi("latent", F, ["frames", C, "height", "width"])],
            [vi("image", F, ["frames", 3, "image_height", "image_width"])],
            [const("w", nets.dec_w[:, :, None, None]), const("b", nets.dec_b)]),
        "vae_encoder": model(
            [n("SpaceToDepth", ["image"], ["x"], blocksize=PATCH),
             n("Conv", ["x", "w"], ["latent"])],
            [vi("image", F, ["frames", 3, "image_height", "image_width"])],
            [vi("latent", F, ["frames", C, "height", "width"])],
            [const("w", nets.enc_w[:, :, None, None])]),
    }
    return models


def _tensor(name, dtype, dims):
    return {"name": name, "dtype": dtype, "dims": list(dims)}


def fake_networks_entry() -> dict[str, Any]:
    lat5 = ["batch", C, "frames", "height", "width"]
    hw = {"height": [LAT, LAT, LAT], "width": [LAT, LAT, LAT]}
    px = LAT * PATCH
    return {
        "text_encoder": {"onnx": "text_encoder.onnx", "engine": None,
                         "inputs": [_tensor("input_ids", "int64", ["batch", SEQ])],
                         "outputs": [_tensor("last_hidden_state", "float32", ["batch", SEQ, HIDDEN])],
                         "profile": {"batch": [1, 2, 2]}, "tolerance": {"max_abs": 1e-4}},
        "unet": {"onnx": "unet.onnx", "engine": None,
                 "inputs": [_tensor("sample", "float32", lat5), _tensor("timestep", "int64", ["batch"]),
                            _tensor("encoder_hidden_states", "float32", ["batch", SEQ, HIDDEN])],
                 "outputs": [_tensor("noise_pred", "float32", lat5)],
                 "profile": {"batch": [1, 2, 2], "frames": list(FRAMES), **hw}},
        "vgt": {"onnx": "vgt.onnx", "engine": None,
                "inputs": [_tensor("sample", "float32", ["batch", C, "frames", LAT, LAT]),
                           _tensor("timestep", "int64", ["batch"])],
                "outputs": [_tensor("delta", "float32", ["batch", C, "frames", LAT, LAT])],
                "profile": {"batch": [1, 1, 2], "frames": list(FRAMES)}},
        "vae_decoder": {"onnx": "vae_decoder.onnx", "engine": None,
                        "inputs": [_tensor("latent", "float32", ["frames", C, "height", "width"])],
                        "outputs": [_tensor("image", "float32", ["frames", 3, "image_height", "image_width"])],
                        "profile": {"frames": list(FRAMES), **hw}},
        "vae_encoder": {"onnx": "vae_encoder.onnx", "engine": None,
                        "inputs": [_tensor("image", "float32", ["frames", 3, "image_height", "image_width"])],
                        "outputs": [_tensor("latent", "float32", ["frames", C, "height", "width"])],
                        "profile": {"frames": list(FRAMES), "image_height": [px, px, px],
                                    "image_width": [px, px, px]}},
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(folder: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recompute ``files`` for every file in ``folder`` and rewrite manifest.json."""
    if manifest is None:
        manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*"))
                         if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def make_engine_folder(folder: Path, seed: int = 0, start_frames: int = 4) -> Path:
    """A complete engine folder with the fake networks; its ``FakeNets`` are seeded by ``seed``."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab_merges(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": SEQ, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    nets = FakeNets(seed, vocab=len(vocab))
    for name, model in _onnx_models(nets).items():
        onnx.save(model, str(folder / f"{name}.onnx"))
    rng = np.random.default_rng(seed + 100)
    start = rng.standard_normal((1, C, start_frames, LAT, LAT)).astype(np.float32)
    np.save(folder / "start_latent.npy", start)
    manifest = {
        "format": "apla-engines", "format_version": 1,
        "networks": fake_networks_entry(),
        "scheduler": SchedulerConfig().to_dict(),
        "vae_scaling_factor": 0.5, "latent_channels": C, "vae_downsample": PATCH,
        "tokenizer": {"dir": "tokenizer", "model_max_length": SEQ},
        "start_latent": "start_latent.npy",
        "prompt": "a man is skiing",
        "sample_defaults": {"steps": 4, "guidance": 3.0, "fps": 6.0},
        "config": {"data": {"start": 0, "stride": 1}},
        "checkpoint_sha256": "0" * 64,
        "versions": {"apla": "test"},
    }
    rehash(folder, manifest)
    return folder


def edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


# --------------------------------------------------------------------------- a NumPy engine


class NumpyRunner:
    """A runner over a NumPy function, with the manifest's checks and ``set_constant``."""

    backend = "numpy"

    def __init__(self, spec: NetworkSpec, fn):
        self.spec, self.fn, self.calls, self.constants = spec, fn, [], {}

    def set_constant(self, name, value):
        if value is None:
            self.constants.pop(name, None)
        else:
            self.constants[name] = value

    def run(self, feeds):
        merged = {**self.constants, **feeds}
        self.spec.check_feeds(merged)
        self.calls.append({k: v.shape for k, v in merged.items()} | {"fed": sorted(feeds)})
        return {self.spec.output_names[0]: self.fn(**merged)}

    def close(self):
        pass


def numpy_engine(folder: Path, nets: FakeNets) -> Engine:
    """An ``Engine`` whose runners are the NumPy twins; no warm-up calls (they have no
    first-call cost, and the tests count the loop's calls)."""
    m = Manifest.open(folder)
    placement = Placement("ort", "the tests' NumPy twins",
                          {name: Choice("ort", "fp32") for name in m.networks})
    engine = Engine(m, placement)
    engine.pool.warm = False
    for name in m.networks:
        engine.runners[name] = NumpyRunner(m.network(name), getattr(nets, name))
    return engine


def settings(steps: int, guidance: float, solver: str = "ddim", **more: Any) -> SamplingSettings:
    """Complete sampling settings for ``Engine.sample``: every step guided and no cache unless
    ``more`` says otherwise."""
    return SamplingSettings(steps, guidance, solver, **more).filled(SamplingSettings())
