"""apla_rt: manifest validation and integrity, tokenizer parity with transformers, the NumPy
loop against a direct computation and the PyTorch reference sampler, ONNX Runtime runners,
and (with a tiny trained and exported run) end-to-end agreement with ``apla_train``.

Most tests use a hand-made engine folder: five small ONNX graphs written with
``onnx.helper`` whose NumPy twins (``FakeNets``) give the expected outputs. The tests at the
end train and export a real tiny run once per session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apla_rt import manifest as M
from apla_rt.errors import BackendUnavailable, InputError, IntegrityError
from apla_rt.manifest import Manifest, NetworkSpec
from apla_rt.pipeline import Engine, Timings, generate, images_to_frames, invert
from apla_rt.runners import select_backend
from apla_rt.schedule import DDIMSchedule, SchedulerConfig, alphas_cumprod, ddim_step
from apla_rt.tokenizer import ClipTokenizer, build_clip_bpe
from apla_rt.video import read_video
from apla_train.components import byte_alphabet  # the same byte-level alphabet CLIP uses

ROOT = Path(__file__).resolve().parents[1]

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


PROMPTS = ["a man is skiing", "", "Spider  Man\tis SKIING on the beach, cartoon style!!",
           "it's 2023: naïve café, 日本 and emoji 🎿", "the skiing man <|endoftext|> again"]


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


@pytest.fixture(scope="session")
def fake_engine(tmp_path_factory) -> Path:
    """A read-only-by-convention fake engine folder; copy it before modifying."""
    return make_engine_folder(tmp_path_factory.mktemp("fake") / "engine")


@pytest.fixture
def engine_copy(fake_engine, tmp_path) -> Path:
    out = tmp_path / "engine"
    shutil.copytree(fake_engine, out)
    return out


def edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


# --------------------------------------------------------------------------- manifest


def test_manifest_accessors(fake_engine):
    m = Manifest.open(fake_engine)
    assert set(m.networks) == {"text_encoder", "unet", "vgt", "vae_decoder", "vae_encoder"}
    unet = m.network("unet")
    assert unet.input_names == ("sample", "timestep", "encoder_hidden_states")
    assert unet.input("sample").dims == ("batch", C, "frames", "height", "width")
    assert unet.input("timestep").dtype == np.int64
    assert unet.dim_range("frames") == FRAMES and unet.onnx == fake_engine / "unet.onnx"
    assert m.scheduler == SchedulerConfig()
    assert m.vae_scaling_factor == 0.5 and m.vae_downsample == PATCH and m.latent_channels == C
    assert m.tokenizer_dir == fake_engine / "tokenizer" and m.model_max_length == SEQ
    assert m.start_latent_shape() == (1, C, 4, LAT, LAT)
    assert m.frame_range() == FRAMES and m.latent_size() == (LAT, LAT)
    assert m.prompt == "a man is skiing" and m.fps == 6.0 and m.versions == {"apla": "test"}
    z = m.load_start_latent()
    assert z.dtype == np.float32 and z.shape == (1, C, 4, LAT, LAT)
    m.verify()


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Manifest.open(tmp_path / "nope")
    with pytest.raises(InputError, match="no manifest.json"):
        Manifest.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not readable JSON"):
        Manifest.open(tmp_path)


def test_unknown_format_version_is_refused(engine_copy):
    edit_manifest(engine_copy, lambda d: d.update(format_version=2))
    with pytest.raises(IntegrityError, match="format_version 2; this apla-rt reads format_version 1"):
        Manifest.open(engine_copy)
    edit_manifest(engine_copy, lambda d: d.update(format_version=1, format="something-else"))
    with pytest.raises(IntegrityError, match="not an apla engine manifest"):
        Manifest.open(engine_copy)


@pytest.mark.parametrize("bad", ["../unet.onnx", "/etc/passwd", "sub/../../x.onnx", "C:\\x.onnx"])
def test_paths_escaping_the_folder_are_refused(engine_copy, bad):
    edit_manifest(engine_copy, lambda d: d["networks"]["unet"].update(onnx=bad))
    with pytest.raises(IntegrityError, match="absolute|outside"):
        Manifest.open(engine_copy)


def test_symlink_escaping_the_folder_is_refused(engine_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(engine_copy / "unet.onnx", outside)
    (engine_copy / "unet.onnx").unlink()
    os.symlink(outside, engine_copy / "unet.onnx")
    with pytest.raises(IntegrityError, match="resolves outside the engine folder"):
        Manifest.open(engine_copy)


def test_tampered_and_missing_artifacts(engine_copy):
    data = bytearray((engine_copy / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (engine_copy / "unet.onnx").write_bytes(bytes(data))
    m = Manifest.open(engine_copy)  # opening reads no artifact
    m.verify(["text_encoder.onnx"])
    with pytest.raises(IntegrityError, match=r"^unet\.onnx does not match its sha256"):
        m.verify()
    with pytest.raises(IntegrityError, match="unet.onnx does not match"):
        generate(engine_copy, "a man is skiing", steps=2)
    (engine_copy / "vgt.onnx").unlink()
    with pytest.raises(IntegrityError, match="vgt.onnx is listed in the manifest but missing"):
        Manifest.open(engine_copy).verify(["vgt.onnx"])


def test_artifact_without_hash_and_bad_hash_are_refused(engine_copy):
    edit_manifest(engine_copy, lambda d: d["files"].pop("vgt.onnx"))
    with pytest.raises(IntegrityError, match="vgt.onnx is used but has no sha256"):
        Manifest.open(engine_copy)
    edit_manifest(engine_copy, lambda d: d["files"].update({"vgt.onnx": "abc"}))
    with pytest.raises(IntegrityError, match="not a lowercase hex sha256"):
        Manifest.open(engine_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["networks"]["unet"]["inputs"][0].update(name="latents"), "the contract says"),
    (lambda d: d["networks"]["unet"]["profile"].update(frames=[4, 2, 6]), "min <= opt <= max"),
    (lambda d: d["networks"]["unet"]["profile"].pop("frames"), "no profile range"),
    (lambda d: d["networks"]["unet"]["inputs"][0].update(dtype="float64"), "dtype"),
    (lambda d: d["networks"].pop("text_encoder"), "missing"),
    (lambda d: d["networks"].update(refiner=d["networks"]["unet"]), "unknown networks"),
    (lambda d: d["scheduler"].update(prediction_type="v_prediction"), "prediction_type"),
    (lambda d: d.update(vae_scaling_factor=-1), "vae_scaling_factor"),
    (lambda d: d.pop("tokenizer"), "tokenizer"),
])
def test_schema_errors(engine_copy, edit, message):
    edit_manifest(engine_copy, edit)
    with pytest.raises(IntegrityError, match=message) as info:
        Manifest.open(engine_copy)
    assert "\n" not in str(info.value)


def test_each_file_is_hashed_once_per_open(fake_engine, monkeypatch):
    calls: list[str] = []
    real = M.sha256_file
    monkeypatch.setattr(M, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    m = Manifest.open(fake_engine)
    m.verify(["unet.onnx"])
    m.verify()
    m.verify(["unet.onnx", "tokenizer"])
    assert sorted(calls) == sorted(Path(f).name for f in m.files)
    Manifest.open(fake_engine).verify(["unet.onnx"])
    assert calls.count("unet.onnx") == 2


def test_check_feeds_against_profile(fake_engine):
    unet = Manifest.open(fake_engine).network("unet")
    ok = {"sample": np.zeros((2, C, 4, LAT, LAT), np.float32), "timestep": np.zeros(2, np.int64),
          "encoder_hidden_states": np.zeros((2, SEQ, HIDDEN), np.float32)}
    assert unet.check_feeds(ok) == {"batch": 2, "frames": 4, "height": LAT, "width": LAT}
    bad = dict(ok, sample=np.zeros((2, C, 9, LAT, LAT), np.float32))
    with pytest.raises(InputError, match=r"frames = 9 is outside the engines' range 1\.\.6"):
        unet.check_feeds(bad)
    with pytest.raises(InputError, match="must be int64"):
        unet.check_feeds(dict(ok, timestep=np.zeros(2, np.int32)))
    with pytest.raises(InputError, match="dim 'batch' is 2 in one input and 1"):
        unet.check_feeds(dict(ok, timestep=np.zeros(1, np.int64)))
    with pytest.raises(InputError, match="shape"):
        unet.check_feeds(dict(ok, sample=np.zeros((2, 3, 4, LAT, LAT), np.float32)))


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    """The same CLIP BPE as vocab.json + merges.txt and as transformers' tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tok")
    write_vocab_merges(root / "bpe")
    saved = root / "json"
    transformers.CLIPTokenizer.from_pretrained(str(root / "bpe")).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file()
    return {"bpe": root / "bpe", "json": saved}


@pytest.mark.parametrize("kind", ["bpe", "json"])
def test_tokenizer_matches_transformers(tokenizer_folders, kind):
    from transformers import CLIPTokenizer

    folder = tokenizer_folders[kind]
    ours = ClipTokenizer.load(folder)
    ref = CLIPTokenizer.from_pretrained(str(folder))
    ids = ours(PROMPTS)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    assert ids.tolist() == want
    assert ours.token_ids("the man is skiing") == ref("the man is skiing").input_ids
    # merges are exercised: "skiing" is a single merged token
    vocab = json.loads((tokenizer_folders["bpe"] / "vocab.json").read_text())
    assert vocab["skiing</w>"] in ours.token_ids("skiing")
    assert ids[1, 2:].tolist() == [ours.eos_id] * 75  # padded with the end token


def test_tokenizer_refuses_long_prompts(tokenizer_folders):
    ours = ClipTokenizer.load(tokenizer_folders["bpe"])
    ours(["x" * 75])  # 75 characters + start + end = 77 tokens: fits
    with pytest.raises(InputError, match="prompt is too long: 78 tokens, the text encoder takes 77"):
        ours(["x" * 76])


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(IntegrityError, match="missing"):
        ClipTokenizer.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="neither tokenizer.json nor"):
        ClipTokenizer.load(tmp_path / "empty")
    with pytest.raises(IntegrityError, match="special token"):
        build_clip_bpe({"a": 0}, [])


# --------------------------------------------------------------------------- the loop


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
    m = Manifest.open(folder)
    engine = Engine(m, "numpy", "test")
    for name in m.networks:
        engine.runners[name] = NumpyRunner(m.network(name), getattr(nets, name))
    return engine


def direct_ddim(z, text, steps, guidance, nets, use_vgt=True):
    """The loop from the equations, float64 schedule, no apla_rt.schedule step functions."""
    cfg = SchedulerConfig()
    abar = alphas_cumprod(cfg)
    ratio = cfg.num_train_timesteps // steps
    z = z.astype(np.float32)
    for t in (np.arange(steps) * ratio)[::-1] + cfg.steps_offset:
        eps = nets.unet(np.concatenate([z, z]), np.array([t, t]), text)
        e = eps[:1] + np.float32(guidance) * (eps[1:] - eps[:1])
        if use_vgt:
            e = e + nets.vgt(z, np.array([t]))
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else abar[0]
        x0 = (z.astype(np.float64) - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        z = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e).astype(np.float32)
    return z


def test_loop_matches_direct_computation(fake_engine):
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    text = engine.encode_text(["", "a man is skiing"])
    start = engine.manifest.load_start_latent()
    for use_vgt in (True, False):
        got = engine.sample(start, text, 5, 7.5, use_vgt)
        want = direct_ddim(start, text, 5, 7.5, nets, use_vgt)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    unet, vgt = engine.runners["unet"], engine.runners["vgt"]
    assert unet.calls[0]["sample"] == (2, C, 4, LAT, LAT) and len(unet.calls) == 10
    assert unet.calls[0]["fed"] == ["sample", "timestep"]  # text given once per loop
    assert not unet.constants  # and taken back after it
    assert vgt.calls[0]["sample"] == (1, C, 4, LAT, LAT) and len(vgt.calls) == 5  # once per step


def test_loop_splits_the_guidance_batch_when_the_profile_says_so(engine_copy):
    edit_manifest(engine_copy, lambda d: d["networks"]["unet"]["profile"].update(batch=[1, 1, 1]))
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(engine_copy, nets)
    text = engine.encode_text(["", "a man is skiing"])
    start = engine.manifest.load_start_latent()
    np.testing.assert_allclose(engine.sample(start, text, 3, 4.0), direct_ddim(start, text, 3, 4.0, nets),
                               rtol=0, atol=1e-5)
    calls = engine.runners["unet"].calls
    assert len(calls) == 6 and all(c["sample"][0] == 1 and "encoder_hidden_states" in c["fed"]
                                   for c in calls)


def test_loop_matches_torch_reference_sampler(fake_engine):
    torch = pytest.importorskip("torch")
    from apla_train.sampling import ddim_invert, ddim_sample

    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    text = engine.encode_text(["", "a man is skiing"])
    start = engine.manifest.load_start_latent()

    def unet(z, t, ehs):
        return torch.from_numpy(nets.unet(z.numpy(), t.numpy(), ehs.numpy()))

    def vgt(z, t):
        return torch.from_numpy(nets.vgt(z.numpy(), t.numpy()))

    want = ddim_sample(unet, vgt, torch.from_numpy(start), torch.from_numpy(text),
                       engine.manifest.scheduler, 6, 12.5).numpy()
    np.testing.assert_allclose(engine.sample(start, text, 6, 12.5), want, rtol=0, atol=1e-5)
    uncond = torch.from_numpy(engine.encode_text([""]))
    want_inv = ddim_invert(unet, vgt, torch.from_numpy(start), uncond, engine.manifest.scheduler, 6).numpy()
    np.testing.assert_allclose(engine.invert_latents(start, 6), want_inv, rtol=0, atol=1e-5)
    assert engine.runners["unet"].calls[-1]["sample"][0] == 1  # inversion: batch 1, no guidance


def test_vgt_with_source_input(engine_copy):
    """A VGT trained with vgt.source gets the clean latent when inverting; generate refuses."""
    def add_source(d):
        vgt = d["networks"]["vgt"]
        vgt["inputs"].append(_tensor("source", "float32", ["batch", C, "frames", LAT, LAT]))
    edit_manifest(engine_copy, add_source)
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(engine_copy, nets)
    seen = []
    engine.runners["vgt"].fn = lambda sample, timestep, source: seen.append(source) or nets.vgt(sample, timestep)
    start = engine.manifest.load_start_latent()
    engine.invert_latents(start, 2)
    assert len(seen) == 2 and all(np.array_equal(s, start) for s in seen)
    text = engine.encode_text(["", "x"])
    with pytest.raises(InputError, match="reads the clean source latent"):
        engine.sample(start, text, 2, 3.0)
    engine.sample(start, text, 2, 3.0, use_vgt=False)


def test_ort_cuda_path_keeps_constants_on_device(fake_engine, monkeypatch):
    """The CUDA branch (I/O binding) with a stand-in binding: constants are uploaded once."""
    import onnxruntime as ort

    from apla_rt.runners import OrtRunner

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
    want = twin.sample(twin.manifest.load_start_latent(), text, 4, 5.0)
    np.testing.assert_allclose(result.latents, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(result.frames, twin.decode(want))
    assert result.backend.startswith("onnxruntime-cpu") and result.vgt
    assert result.frames.shape == (4, LAT * PATCH, LAT * PATCH, 3)
    assert result.timings.calls["unet"] == 4 and result.timings.calls["vgt"] == 4
    assert result.timings.calls["text encoder"] == 1 and result.timings.seconds["unet"] > 0


def test_cpu_guidance_halves_run_side_by_side(fake_engine, monkeypatch):
    """With 2+ CPU threads the UNet runs each guidance half as its own batch-1 call, both at
    once on the one session (single-threaded pool); the result is the batch-2 call's."""
    from apla_rt import runners

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
    one = generate(fake_engine, "a man is skiing", steps=3, guidance=5.0, threads=1)
    assert [(b, t) for _, b, t in seen] == [(2, 2)] * 3  # one thread: one batch-2 call per step
    seen.clear()
    with Engine.open(fake_engine, "ort", ("unet",), threads=2) as engine:
        assert engine.split_guidance
        options = engine.runners["unet"].session.get_session_options()
        assert options.intra_op_num_threads == 1  # + the second caller: 2 threads in all
    two = generate(fake_engine, "a man is skiing", steps=3, guidance=5.0, threads=2)
    assert [(b, t) for _, b, t in seen] == [(1, 1)] * 6
    assert len({tid for tid, _, _ in seen}) == 2
    np.testing.assert_allclose(two.latents, one.latents, rtol=0, atol=1e-5)
    assert np.abs(two.frames.astype(int) - one.frames).max() <= 1
    assert two.timings.calls["unet"] == 3


def test_decode_in_chunks_of_the_vae_profile(fake_engine, monkeypatch):
    import apla_rt.pipeline as P

    monkeypatch.setattr(P, "DECODE_CHUNK", 2)
    nets = FakeNets(0, vocab=600)
    engine = numpy_engine(fake_engine, nets)
    z = np.random.default_rng(1).standard_normal((1, C, 5, LAT, LAT)).astype(np.float32)
    frames = engine.decode(z)
    assert [c["latent"][0] for c in engine.runners["vae_decoder"].calls] == [2, 2, 1]
    np.testing.assert_array_equal(frames, images_to_frames(nets.vae_decoder(z[0].transpose(1, 0, 2, 3))))


def test_generate_writes_mp4_and_gif(fake_engine, tmp_path):
    for ext in ("mp4", "gif"):
        out = tmp_path / f"v.{ext}"
        result = generate(fake_engine, "a man is skiing", out, steps=2, from_noise=True, frames=3,
                          seed=7)
        assert result.path == out and out.is_file()
        assert read_video(out).shape[0] == 3
    again = generate(fake_engine, "a man is skiing", steps=2, from_noise=True, frames=3, seed=7)
    np.testing.assert_array_equal(again.start, result.start)
    other = generate(fake_engine, "a man is skiing", steps=2, from_noise=True, frames=3, seed=8)
    assert not np.array_equal(other.start, result.start)
    noise = np.random.default_rng(7).standard_normal((1, C, 3, LAT, LAT)).astype(np.float32)
    np.testing.assert_array_equal(result.start, noise)


def test_generate_input_errors(fake_engine, tmp_path):
    with pytest.raises(InputError, match=r"^--frames 40 is outside the engines' range 1\.\.6 \(frames\)$"):
        generate(fake_engine, "x", steps=2, from_noise=True, frames=40)
    with pytest.raises(InputError, match="differs from the 4 frames .* pass --from-noise"):
        generate(fake_engine, "x", steps=2, frames=3)
    with pytest.raises(InputError, match="--steps must be an integer from 1 to 1000"):
        generate(fake_engine, "x", steps=0)
    with pytest.raises(InputError, match="--guidance must be a finite number"):
        generate(fake_engine, "x", steps=1, guidance=float("nan"))
    latent = tmp_path / "z.npy"
    np.save(latent, np.zeros((1, 3, 4, LAT, LAT), np.float32))
    with pytest.raises(InputError, match=r"has shape \[1, 3, 4, 4, 4\]"):
        generate(fake_engine, "x", steps=1, latent=latent)
    with pytest.raises(InputError, match="exclude each other"):
        generate(fake_engine, "x", steps=1, latent=latent, from_noise=True)
    np.save(latent, np.zeros((1, C, 4, LAT + 1, LAT), np.float32))
    with pytest.raises(InputError, match="height = 5 is outside the engines' range 4..4"):
        generate(fake_engine, "x", steps=1, latent=latent)


def test_generate_from_latent_file_and_no_vgt(fake_engine, tmp_path):
    z = np.random.default_rng(3).standard_normal((1, C, 2, LAT, LAT)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    with_vgt = generate(fake_engine, "a man is skiing", steps=3, latent=tmp_path / "z.npy")
    without = generate(fake_engine, "a man is skiing", steps=3, latent=tmp_path / "z.npy", use_vgt=False)
    assert with_vgt.frames.shape[0] == 2 and not without.vgt
    assert not np.allclose(with_vgt.latents, without.latents)
    assert without.timings.calls["vgt"] == 0


def test_invert_writes_npy(fake_engine, tmp_path):
    frames = (np.random.default_rng(0).random((5, 8, 8, 3)) * 255).astype(np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:02d}.png")
    result = invert(folder, fake_engine, tmp_path / "z.npy", steps=3)
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (1, C, 4, LAT, LAT) and np.array_equal(z, result.latent)
    nets = FakeNets(0, vocab=600)
    clean = nets.vae_encoder(frames[:4].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(result.clean[0], clean.transpose(1, 0, 2, 3), atol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        invert(folder, fake_engine, tmp_path / "z.npy", steps=3)


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
    from apla_rt.runners import trt_available

    ok, why = trt_available()
    if not ok:
        assert select_backend("auto", m, nets) == ("ort", why)
        with pytest.raises(BackendUnavailable, match="--backend trt: "):
            select_backend("trt", m, nets)
        generate(engine_copy, "a man is skiing", steps=1)  # auto -> ORT, .plan files never read


@pytest.mark.tensorrt
def test_tensorrt_runner_matches_onnxruntime(tmp_path):
    from apla_rt.runners import trt_available

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


def test_runtime_never_imports_torch(fake_engine, tmp_path):
    """generate through the CLI with torch, apla_train and export made unimportable."""
    out = tmp_path / "v.gif"
    code = (
        "import sys\n"
        "for name in ('torch', 'apla_train', 'export', 'transformers', 'diffusers'):\n"
        "    sys.modules[name] = None\n"
        "from apla_rt.cli import main\n"
        "try:\n"
        f"    main(['generate', '--engine-dir', {str(fake_engine)!r}, '--prompt', 'a man is skiing',"
        f" '--out', {str(out)!r}, '--steps', '2', '--quiet'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'apla_train', 'export')"
        " and sys.modules[m] is not None]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok") and out.is_file()


def test_timings_table():
    t = Timings()
    with t("unet"):
        pass
    with t("unet"):
        pass
    table = t.table()
    assert "unet" in table and "total" in table and t.calls["unet"] == 2
    assert set(t.as_dict()) >= {"text encoder", "unet", "vgt", "ddim", "vae", "video write", "total"}


# --------------------------------------------------------------------------- a real exported run


TINY_ARGS = ["--prompt", "a man is skiing", "--model", "tiny", "--steps", "6", "--frames", "4",
             "--size", "32", "--set", "loss.adv_start=2", "--set", "sample.steps=2",
             "--set", "sample.inversion_steps=2", "--quiet"]


@pytest.fixture(scope="session")
def exported(request, tmp_path_factory):
    """A tiny trained run (the session's ``tiny_run`` where conftest has it), exported to ONNX
    once: (run, engine folder)."""
    pytest.importorskip("torch")
    from export.pipeline import export_run

    try:
        run, _ = request.getfixturevalue("tiny_run")
    except pytest.FixtureLookupError:
        from click.testing import CliRunner
        from conftest import clip_path

        from apla_train.cli import main as train_main

        run = tmp_path_factory.mktemp("rt-run") / "run"
        result = CliRunner().invoke(train_main, [str(clip_path("man-skiing.mp4")), "--out", str(run),
                                                 *TINY_ARGS])
        assert result.exit_code == 0, result.output
    out = tmp_path_factory.mktemp("exported") / "engine"
    export_run(run, out, backend="onnx", log=lambda m: None)
    return run, out


@pytest.fixture(scope="session")
def reference(exported):
    """The PyTorch reference models of the run: (cfg, components, vgt)."""
    import torch

    from export.pipeline import load_run

    run, _ = exported
    torch.set_num_threads(2)
    cfg, components, vgt, _ = load_run(run)
    return cfg, components, vgt


@pytest.mark.slow
def test_exported_generate_matches_reference_sampler(exported, reference, tmp_path):
    import torch

    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample, decode_video, psnr

    run, engine = exported
    cfg, comp, vgt = reference
    steps, guidance = 4, 12.5
    out = tmp_path / "rt.mp4"
    rt = generate(engine, cfg.prompt, out, steps=steps, guidance=guidance, threads=2)
    start = torch.from_numpy(np.load(run / "start_latent.npy"))
    np.testing.assert_array_equal(rt.start, start.numpy())
    with torch.no_grad():
        text = torch.cat([encode_prompts(comp, [""]), encode_prompts(comp, [cfg.prompt])])
        z = ddim_sample(comp.unet, vgt, start, text, comp.scheduler, steps, guidance)
        frames = decode_video(comp.codec, z)
    diff = float(np.abs(rt.latents - z.numpy()).max())
    assert diff < 1e-3, diff
    assert psnr(rt.frames, frames) >= 40.0
    assert read_video(out).shape[0] == cfg.data.n_frames
    gif = generate(engine, "a man is skiing at sunset", tmp_path / "noise.gif", steps=2,
                   from_noise=True, frames=3, seed=1)
    assert read_video(gif.path).shape == (3, cfg.data.size, cfg.data.size, 3)


@pytest.mark.slow
def test_exported_vgt_contribution_is_small_but_nonzero(exported):
    _, folder = exported
    with Engine.open(folder, "ort", threads=2) as engine:
        text = engine.encode_text(["", "a man is skiing"])
        z = engine.manifest.load_start_latent()
        schedule = DDIMSchedule.build(engine.manifest.scheduler, 3)
        ratios = []
        for t in schedule.timesteps:
            eps_hat, eps_theta, delta = engine.predict_noise(z, int(t), text, 12.5)
            ratios.append(float(np.linalg.norm(delta) / np.linalg.norm(eps_theta)))
            z = ddim_step(eps_hat, int(t), z, schedule)
    assert all(r > 0 for r in ratios), ratios  # trained: the VGT's last layer moved off zero
    assert max(ratios) < 0.3, ratios  # a perturbation, small next to the UNet's prediction
    with_vgt = generate(folder, "a man is skiing", steps=3)
    without = generate(folder, "a man is skiing", steps=3, use_vgt=False)
    assert float(np.abs(with_vgt.latents - without.latents).max()) > 1e-6


@pytest.mark.slow
def test_exported_invert_round_trip(exported):
    """Inverting the training clip gives the run's start latent (same predictor, same steps)."""
    run, folder = exported
    cfg = json.loads((run / "config.json").read_text())
    result = invert(cfg["video"], folder, steps=cfg["sample"]["inversion_steps"], threads=2)
    want = np.load(run / "start_latent.npy")
    assert result.latent.shape == want.shape
    diff = float(np.abs(result.latent - want).max())
    assert diff < 1e-2, diff


@pytest.mark.slow
def test_exported_tampered_unet_is_refused(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / "engine"
    shutil.copytree(folder, copy)
    # the ONNX Runtime backend loads the fused-attention flavour; it is what must be verified
    data = bytearray((copy / "unet.ort.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "unet.ort.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"unet\.ort\.onnx does not match its sha256"):
        generate(copy, "a man is skiing", steps=1)


def test_generate_defaults_to_the_runs_sampling_settings(exported):
    """Without --steps/--guidance the runtime samples as the run was configured to (the tiny
    preset's guidance 3 rather than SD's 12.5, which burns a tiny model's video)."""
    _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    defaults = manifest["sample_defaults"]
    result = generate(folder, "a man is skiing")
    assert result.steps == defaults["steps"] and result.guidance == defaults["guidance"]
    explicit = generate(folder, "a man is skiing", steps=1, guidance=7.5)
    assert (explicit.steps, explicit.guidance) == (1, 7.5)
