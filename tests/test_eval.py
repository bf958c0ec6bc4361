"""apla_eval: metrics on constructed and real clips, the embedders, and the apla-eval CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import clip_path

from apla_eval import metrics as M
from apla_rt.media.video import read_video, write_video


@pytest.fixture(scope="module")
def car_path():
    """car-turn.mp4, else the repository's example clip (man-skiing): a real, moving clip."""
    return clip_path("car-turn.mp4")


@pytest.fixture(scope="module")
def car(car_path) -> np.ndarray:
    """12 frames of the clip (stride 2) at 128 x 128."""
    return read_video(car_path, stride=2, n_frames=12, size=128)


def textured(size: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture, good for optical flow."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def shifted_clip(dx: int, dy: int, n: int = 5, size: int = 96) -> np.ndarray:
    """Frame k is a window of a large texture moved so its content shifts by (k dx, k dy)."""
    big = textured(size + 2 * n * (abs(dx) + abs(dy)) + 2)
    m = n * (abs(dx) + abs(dy))
    return np.stack([big[m - k * dy:m - k * dy + size, m - k * dx:m - k * dx + size] for k in range(n)])


# --- embeddings-based metrics --------------------------------------------------------------------

def test_frame_consistency_of_identical_and_orthogonal_embeddings():
    same = np.tile(np.arange(1.0, 9.0), (5, 1))
    assert M.frame_consistency(same) == pytest.approx({"all_pairs": 1.0, "consecutive": 1.0})
    eye = np.eye(4)
    assert M.frame_consistency(eye) == pytest.approx({"all_pairs": 0.0, "consecutive": 0.0})
    # alternating +e, -e: every consecutive pair is -1; of the 12 ordered pairs, 4 are +1
    alt = np.array([[1.0, 0], [-1, 0], [1, 0], [-1, 0]])
    fc = M.frame_consistency(alt)
    assert fc["consecutive"] == pytest.approx(-1.0) and fc["all_pairs"] == pytest.approx(-1 / 3)
    assert M.clip_score(same, np.arange(1.0, 9.0)) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        M.frame_consistency(np.ones((1, 8)))


# --- flow, warp error, motion ----------------------------------------------------------------------

@pytest.mark.parametrize("dx,dy", [(2, 1), (-1, 3)])
def test_farneback_recovers_a_known_shift(dx, dy):
    clip = shifted_clip(dx, dy)
    flow = M.optical_flow(clip[0], clip[1])
    interior = flow[16:-16, 16:-16].reshape(-1, 2)
    assert np.abs(np.median(interior, axis=0) - (dx, dy)).max() < 0.5
    assert np.percentile(np.abs(interior - (dx, dy)).max(axis=1), 90) < 0.5
    assert M.warp_error(clip) < 0.01
    assert not M.motion(clip)["is_static"]
    assert M.motion(clip)["mean_flow_px"] == pytest.approx(math.hypot(dx, dy), abs=0.5)


def test_frozen_video_is_static_and_perfectly_consistent():
    frozen = np.repeat(textured(64)[None], 6, axis=0)
    mo = M.motion(frozen)
    assert mo["is_static"] and mo["mean_abs_diff"] == 0.0 and mo["p99_flow_px"] < 0.1
    assert M.warp_error(frozen) < 1e-3


def test_real_clip_moves_and_shuffling_it_hurts(car):
    mo = M.motion(car)
    assert not mo["is_static"] and mo["p99_flow_px"] > 2 * M.STATIC_FLOW_PX
    assert M.motion(np.repeat(car[:1], 6, axis=0))["is_static"]

    from apla_eval.embedders import OfflineEmbedder

    shuffled = car[np.random.default_rng(0).permutation(len(car))]
    emb = OfflineEmbedder()
    fc, fc_shuffled = (M.frame_consistency(emb.embed_images(v)) for v in (car, shuffled))
    assert fc["consecutive"] > fc_shuffled["consecutive"]
    assert fc["all_pairs"] == pytest.approx(fc_shuffled["all_pairs"], abs=1e-5)  # order-free
    assert M.warp_error(shuffled) > 1.5 * M.warp_error(car)


# --- against a source ----------------------------------------------------------------------------

def test_psnr_ssim_identities(car):
    p, s = M.psnr(car, car), M.ssim(car, car)
    assert p["mean"] == math.inf and all(v == math.inf for v in p["per_frame"])
    assert s["mean"] == pytest.approx(1.0) and len(s["per_frame"]) == len(car)
    rng = np.random.default_rng(0)
    noisy = np.clip(car + rng.normal(0, 10, car.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(car + rng.normal(0, 30, car.shape), 0, 255).astype(np.uint8)
    pn, pnn = M.psnr(noisy, car)["mean"], M.psnr(noisier, car)["mean"]
    assert math.isfinite(pn) and 25 < pn < 35 and pnn < pn
    sn, snn = M.ssim(noisy, car)["mean"], M.ssim(noisier, car)["mean"]
    assert snn < sn < 1.0
    with pytest.raises(ValueError, match="sampled the same way"):
        M.psnr(car[:4], car[:5])


def test_lpips_is_reported_unavailable_without_weights(car, monkeypatch):
    import sys

    from apla_eval.embedders import lpips_to_source

    value, note = lpips_to_source(car[:2], car[:2], weights="/nonexistent/alexnet.pth")
    assert value is None and note.startswith("LPIPS: unavailable")

    import apla_train.losses

    # with weights, the per-frame distances of the loaded module are reported as they are
    fake = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    monkeypatch.setattr(apla_train.losses, "load_lpips", lambda net, weights: fake)
    value, note = lpips_to_source(car[:3], car[1:4])
    assert note == "LPIPS (alex)" and len(value["per_frame"]) == 3
    expected = np.abs(car[:3].astype(np.float64) - car[1:4]).mean() / 127.5
    assert value["mean"] == pytest.approx(expected, rel=1e-4)

    monkeypatch.setitem(sys.modules, "apla_train.losses", None)  # module not there (yet)
    value, note = lpips_to_source(car[:2], car[:2])
    assert value is None and note.startswith("LPIPS: unavailable")


# --- embedders ----------------------------------------------------------------------------------

def test_offline_embedder_is_normalised_and_labelled(car):
    from apla_eval.embedders import OfflineEmbedder
    from apla_rt.errors import BackendUnavailable

    emb = OfflineEmbedder()
    e = emb.embed_images(car[:3])
    assert e.shape == (3, 1280) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert "NOT CLIP" in emb.name and not emb.is_clip and not emb.has_text
    with pytest.raises(BackendUnavailable):
        emb.embed_text("a jeep")


def test_offline_embedder_classifies_imagenet_images():
    """The hand-built network matches the shipped weights: skimage's coffee is an espresso."""
    import torch
    from skimage import data

    from apla_eval.embedders import OfflineEmbedder, lite0_preprocess

    model = OfflineEmbedder().model
    with torch.inference_mode():
        probs = model(lite0_preprocess(data.coffee()[None])).softmax(-1)[0]
    assert int(probs.argmax()) == 967 and float(probs.max()) > 0.5  # ImageNet 967: espresso


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, others to 256+n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, monkeypatch_module):
    """A random CLIP with 32-wide towers and a byte-level tokenizer, saved like a real one."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=16),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_clip_embedder_loads_a_local_folder(tiny_clip, car):
    from apla_eval.embedders import ClipEmbedder

    emb = ClipEmbedder(tiny_clip)
    e, t = emb.embed_images(car[:4]), emb.embed_text("a jeep car is moving on the road " * 8)
    assert e.shape == (4, 16) and t.shape == (16,)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5) and np.isclose(np.linalg.norm(t), 1.0)
    assert emb.is_clip and "CLIP" in emb.name
    assert -100 <= M.clip_score(e, t) <= 100
    # against CLIP's own forward pass: logits_per_image is logit_scale.exp() x cosine
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    inputs = CLIPProcessor.from_pretrained(tiny_clip)(text=["a jeep car is moving on the road " * 8],
                                                      images=list(car[:4]), return_tensors="pt",
                                                      padding=True, truncation=True)
    with torch.inference_mode():
        out = model(**inputs)
        cosine = out.logits_per_image[:, 0] / model.logit_scale.exp()
    # float32 embeddings normalised two ways: measured 5e-7 apart on this 0..100 scale
    assert M.clip_score(e, t) == pytest.approx(100 * float(cosine.mean()), abs=1e-4)


def test_clip_embedder_rejects_bad_folders(tmp_path):
    from apla_eval.embedders import ClipEmbedder
    from apla_rt.errors import InputError

    with pytest.raises(InputError, match="not found"):
        ClipEmbedder(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="not a CLIP model"):
        ClipEmbedder(tmp_path)


# --- CLI ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_video(tmp_path_factory, car) -> tuple:
    folder = tmp_path_factory.mktemp("cli")
    video = folder / "gen.mp4"
    write_video(video, car[6:], fps=8.0)  # 6 frames, 128 x 128, where the car turns
    return folder, video


def test_cli_prints_the_table_and_writes_json(small_video, car_path, tiny_clip):
    from apla_eval.cli import main

    folder, video = small_video
    out = folder / "eval.json"
    args = [str(video), "--prompt", "a jeep car", "--source", str(car_path),
            "--source-start", "12", "--source-stride", "2", "--clip", str(tiny_clip), "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for label in ("frame consistency (all pairs)", "CLIP score", "warp error", "static",
                  "PSNR vs source", "SSIM vs source", "LPIPS vs source"):
        assert label in result.output
    assert "source read as 6 frames from frame 12, stride 2" in result.output
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["embedder_is_clip"] and report["video"]["frames"] == 6
    assert isinstance(m["clip_score"], float) and m["motion"]["is_static"] is False
    assert 20 < m["psnr"]["mean"] < 60 and 0.5 < m["ssim"]["mean"] <= 1.0

    again = CliRunner().invoke(main, args)  # refuses to overwrite
    assert again.exit_code == 2 and "error:" in again.output and "--force" in again.output
    assert CliRunner().invoke(main, args + ["--force"]).exit_code == 0


def test_cli_offline_embedder_is_labelled_not_clip(small_video):
    from apla_eval.cli import main

    folder, video = small_video
    result = CliRunner().invoke(main, [str(video), "--prompt", "a jeep", "--json", str(folder / "off.json")])
    assert result.exit_code == 0, result.output
    assert "embedder: efficientnet-lite0 (ImageNet; offline stand-in, NOT CLIP)" in result.output
    report = json.loads((folder / "off.json").read_text())
    assert report["embedder_is_clip"] is False and "NOT CLIP" in report["embedder"]
    assert report["metrics"]["clip_score"] is None


def test_cli_flags_a_frozen_video(tmp_path, car):
    from apla_eval.cli import main

    video = tmp_path / "frozen.mp4"
    write_video(video, np.repeat(car[:1, ::2, ::2], 6, axis=0), fps=8.0)
    result = CliRunner().invoke(main, [str(video)])
    assert result.exit_code == 0, result.output
    assert "STATIC video" in result.output
    static_row = next(line for line in result.output.splitlines() if line.startswith("static "))
    assert "yes" in static_row


@pytest.mark.parametrize("case", ["missing video", "missing clip folder", "one frame"])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, car, case):
    from apla_eval.cli import main

    video = tmp_path / "v.mp4"
    args = [str(video)]
    if case == "missing clip folder":
        write_video(video, car[:3, ::2, ::2])
        args += ["--clip", str(tmp_path / "no-clip")]
    elif case == "one frame":
        (tmp_path / "frames").mkdir()
        import PIL.Image

        PIL.Image.fromarray(car[0]).save(tmp_path / "frames" / "0000.png")
        args = [str(tmp_path / "frames")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
