"""``--pretrained ORG/NAME``: a saved tiny folder placed in a temporary Hugging Face cache
(``models--ORG--NAME/snapshots/<rev>/``, ``refs/main``) loads by id with ``HF_HUB_OFFLINE=1``,
an fp16 weights variant loads as float32, and a missing id is one line naming the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apla_rt.errors import InputError
from apla_train import hub
from apla_train.components import build_tiny, load_pretrained, save_components

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_components():
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    return build_tiny(frames, patch=4, seed=3)


def _place_in_cache(components, cache: Path, repo: str, variant: str | None = None) -> Path:
    org, name = repo.split("/")
    storage = cache / f"models--{org}--{name}"
    snapshot = storage / "snapshots" / REV
    save_components(components, snapshot)
    if variant:  # re-save the weights as e.g. *.fp16.safetensors only, as such repos hold them
        for sub in ("unet", "vae", "text_encoder"):
            for f in (snapshot / sub).glob("*.safetensors"):
                f.unlink()
        _save_variant(components, snapshot, variant)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(REV)
    return snapshot


def _save_variant(components, snapshot: Path, variant: str) -> None:
    from diffusers import UNet2DConditionModel

    unet2d = UNet2DConditionModel.from_config(dict(components.unet.config))
    state = {k: v for k, v in components.unet.state_dict().items() if "_temp." not in k}
    unet2d.load_state_dict(state, strict=True)
    unet2d.half().save_pretrained(snapshot / "unet", variant=variant)
    components.codec.vae.save_pretrained(snapshot / "vae", variant=variant)
    components.text_encoder.half().save_pretrained(snapshot / "text_encoder", variant=variant)
    components.text_encoder.float()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME = a temporary folder, HF_HUB_OFFLINE=1, no other cache variable."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def _unet2d_state(components) -> dict[str, torch.Tensor]:
    return {k: v for k, v in components.unet.state_dict().items() if "_temp." not in k}


def test_repo_id_loads_offline_from_the_cache(tiny_components, offline_cache):
    snapshot = _place_in_cache(tiny_components, offline_cache, "apla-test/tiny-sd")
    assert hub.hub_cache_dir() == offline_cache and hub.hub_offline()
    assert hub.resolve_pretrained("apla-test/tiny-sd") == snapshot
    loaded = load_pretrained("apla-test/tiny-sd")
    want, got = _unet2d_state(tiny_components), _unet2d_state(loaded)
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    ids = loaded.tokenizer("a man is skiing").input_ids
    assert ids == tiny_components.tokenizer("a man is skiing").input_ids


def test_fp16_variant_loads_as_float32(tiny_components, offline_cache):
    _place_in_cache(tiny_components, offline_cache, "apla-test/tiny-fp16", variant="fp16")
    snapshot = hub.resolve_pretrained("apla-test/tiny-fp16", "fp16")
    assert list((snapshot / "unet").glob("*.fp16.safetensors"))
    assert not [p for p in (snapshot / "unet").glob("*.safetensors") if ".fp16." not in p.name]
    for variant in ("fp16", None):  # None: the folder holds only fp16 weights, found by itself
        loaded = load_pretrained("apla-test/tiny-fp16", variant=variant)
        want, got = _unet2d_state(tiny_components), _unet2d_state(loaded)
        assert all(v.dtype == torch.float32 for v in got.values())
        worst = max(float((want[k] - got[k]).abs().max()) for k in want)
        assert 0 < worst < 1e-2  # rounded to fp16, nothing else
        # exactly the fp16-rounded weights: float32 -> float16 -> float32 is what the variant
        # holds and what loading it gives back, so no tolerance is needed
        assert all(torch.equal(got[k], want[k].half().float()) for k in want)
        text_want = {k: v.half().float() if v.is_floating_point() else v
                     for k, v in tiny_components.text_encoder.state_dict().items()}
        text_got = loaded.text_encoder.state_dict()
        assert set(text_got) == set(text_want)
        assert all(torch.equal(text_got[k], text_want[k]) for k in text_want)
        assert next(loaded.text_encoder.parameters()).dtype == torch.float32


def test_missing_id_is_one_line_naming_the_cache(offline_cache):
    with pytest.raises(InputError) as err:
        load_pretrained("nobody/not-cached")
    message = str(err.value)
    assert "\n" not in message and str(offline_cache) in message and "HF_HUB_OFFLINE" in message
    assert "nobody/not-cached" in message


def test_cli_missing_id_is_one_line(offline_cache, skiing, tmp_path):
    from click.testing import CliRunner

    from apla_train.cli import main

    result = CliRunner().invoke(main, [str(skiing), "--prompt", "a man",
                                       "--pretrained", "nobody/not-cached", "--variant", "fp16",
                                       "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(offline_cache) in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, ok", [("runwayml/stable-diffusion-v1-5", True), ("a/b", True),
                                      ("plain-name", False), ("a/b/c", False), ("../x", False),
                                      ("org/..", False), ("/abs/path", False)])
def test_repo_id_syntax(name, ok):
    assert hub.is_repo_id(name) is ok


def test_not_a_folder_nor_an_id(tmp_path):
    with pytest.raises(InputError, match="is not a folder, nor a Hugging Face repo id"):
        hub.resolve_pretrained(str(tmp_path / "missing" / "deep" / "folder"))
    with pytest.raises(InputError, match="--variant"):
        hub.resolve_pretrained("a/b", "fp16; rm")


def test_download_patterns_pick_the_variant():
    allow, ignore = hub.download_patterns("fp16")
    assert "unet/*.fp16.safetensors" in allow and "*.fp16.safetensors" not in ignore
    allow, ignore = hub.download_patterns(None)
    assert "unet/*.safetensors" in allow and "*.fp16.safetensors" in ignore
    assert "*non_ema*" in ignore and "*.ckpt" in ignore
    assert {p.split("/")[0] for p in allow if "/" in p} == set(hub.SUBFOLDERS)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub" and not hub.hub_offline()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub.hub_cache_dir() == tmp_path / "direct"
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.hub_offline()
