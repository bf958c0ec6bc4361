"""The deep/shallow UNet cache (DeepCache) through the export and the runtime, on the
session's tiny run exported once (``exported`` in conftest.py):

* the exported graphs: the shallow graph fed the feature the full graph just produced from
  the same input gives the full graph's noise (both flavours), and the full graph's noise is
  the UNet's; the manifest lists them with the branch, and all three UNet graphs point into
  one ``unet.onnx.data`` that holds the UNet's weights once;
* the loop: ``cache_interval=1`` is today's loop exactly (the same output as a folder without
  the cache graphs, which still generates), ``cache_interval=3`` runs the planned numbers of
  full and shallow calls and stays close to the uncached result, with the text pinned or the
  guidance halves side by side alike;
* the plan and the rows rule (``apla_rt.sampling.deepcache``), and bad input in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import require

from apla_rt.sampling.deepcache import FeatureCache, check_cache_interval, full_steps
from apla_rt.errors import InputError
from apla_rt.folder.files import sha256_file
from apla_rt.folder.manifest import Manifest

STEPS = 7  # cache interval 3: full at 0, 3, 6; shallow at 1, 2, 4, 5
UNET_GRAPHS = ("unet", "unet_feature", "unet_shallow")


@pytest.fixture(scope="module")
def without_cache(exported, tmp_path_factory) -> Path:
    """The exported folder without the DeepCache graphs, as a folder exported before them
    lists its networks (the manifest and files edited consistently)."""
    _, engine = exported
    out = tmp_path_factory.mktemp("nocache") / "engine"
    shutil.copytree(engine, out)
    data = json.loads((out / "manifest.json").read_text())
    for name in ("unet_feature", "unet_shallow"):
        entry = data["networks"].pop(name)
        for key in ("onnx", "onnx_ort"):
            (out / entry[key]).unlink()
            del data["files"][entry[key]]
    data.pop("deepcache")
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def _feeds(rows: int = 2, frames: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((rows, 4, frames, 8, 8)).astype(np.float32),
            "timestep": np.array([701, 41][:rows], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((rows, 77, 32)).astype(np.float32)}


def test_exported_shallow_graph_fed_the_full_feature_is_the_full_unet(exported):
    import onnxruntime as ort

    _, engine = exported
    feeds = _feeds()
    for suffix in (".onnx", ".ort.onnx"):
        def session(name: str):
            return ort.InferenceSession(str(engine / f"{name}{suffix}"), providers=["CPUExecutionProvider"])

        noise, feature = session("unet_feature").run(["noise_pred", "feature"], feeds)
        plain = session("unet").run(["noise_pred"], feeds)[0]
        assert feature.shape == (2, 64, 4, 8, 8)
        assert np.abs(noise - plain).max() <= 1e-5
        shallow = session("unet_shallow")
        out = shallow.run(["noise_pred"], {**feeds, "feature": feature})[0]
        assert np.abs(out - noise).max() <= 1e-5, suffix
        moved = shallow.run(["noise_pred"], {**feeds, "feature": feature * 0.5})[0]
        assert np.abs(moved - noise).max() > 1e-3  # the graph reads its feature


def test_manifest_lists_the_cache_graphs_on_one_weight_file(exported, reference):
    _, engine = exported
    _, components, _ = reference
    manifest = Manifest.open(engine)
    assert manifest.data["deepcache"] == {"branch": 0, "full": "unet_feature", "shallow": "unet_shallow"}
    assert [t.name for t in manifest.network("unet_feature").outputs] == ["noise_pred", "feature"]
    assert "feature" in manifest.network("unet_shallow").input_names
    validation = json.loads((engine / "validation.json").read_text())["networks"]
    for name in UNET_GRAPHS:
        spec = manifest.network(name)
        assert [manifest.rel(p) for p in spec.external_data] == ["unet.onnx.data"]
        assert validation[name]["passed"] and validation[name + ".ort"]["passed"]
        for path in (spec.onnx, spec.onnx_ort):
            assert path is not None
            model = onnx.load(str(path), load_external_data=False)
            for t in model.graph.initializer:  # every tensor from 1 KiB is in the shared file
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    assert {e.key: e.value for e in t.external_data}["location"] == "unet.onnx.data"
                else:
                    assert len(t.raw_data) < 1024, (path.name, t.name)
    assert sorted(p.name for p in engine.glob("*.data")) == ["unet.onnx.data"]
    weights = sum(p.numel() * p.element_size() for p in components.unet.parameters())
    assert (engine / "unet.onnx.data").stat().st_size <= 1.05 * weights


def _generate(engine: Path, threads: int | None = 2, **kwargs):
    from apla_rt import Pipeline

    # ONNX Runtime fp32 (not the machine's measured choice, which may differ with the threads):
    # the comparisons below are between loops, not backends
    with Pipeline.open(engine, "ort-cpu", threads) as pipe:
        video, = pipe.generate("a man is skiing", steps=STEPS, guidance=7.5, **kwargs)
        return video, dict(pipe.timings.calls)


def test_a_folder_without_cache_graphs_generates_and_interval_1_is_todays_loop(exported, without_cache):
    _, engine = exported
    old, old_calls = _generate(without_cache)
    assert not Manifest.open(without_cache).has("unet_feature")
    for kwargs in ({}, {"cache_interval": 1}):
        new, calls = _generate(engine, **kwargs)
        np.testing.assert_array_equal(new.latents, old.latents)
        np.testing.assert_array_equal(new.frames, old.frames)
        assert calls["unet"] == STEPS and calls.get("unet shallow", 0) == 0
    with pytest.raises(InputError, match="needs the DeepCache graphs"):
        _generate(without_cache, cache_interval=3)


def test_interval_3_runs_the_plan_and_stays_close(exported):
    _, engine = exported
    plain, _ = _generate(engine, threads=None)
    results = {}
    for threads in (None, 2):  # text pinned on the cache graphs / guidance halves side by side
        video, calls = _generate(engine, threads=threads, cache_interval=3)
        assert (calls["unet"], calls["unet shallow"]) == (3, 4)
        results[threads] = video
        assert video.settings.cache_interval == 3
    np.testing.assert_allclose(results[None].latents, results[2].latents, atol=1e-4)
    # measured on a run trained with the session's settings (7 steps, guidance 7.5): max
    # |latent difference| 3.0 % of max |latent| (0.52 of 17.3), frames 35.5 dB apart (the
    # nonuniform plan: 0.7 %, 49 dB); bounds with ~3x / 10 dB of margin
    err = float(np.abs(results[None].latents - plain.latents).max())
    scale = float(np.abs(plain.latents).max())
    assert 0 < err < 0.1 * scale, (err, scale)
    frames = [v.frames.astype(np.float64) for v in (results[None], plain)]
    psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((frames[0] - frames[1]) ** 2), 1e-12))
    assert psnr > 25, psnr
    nonuniform, calls = _generate(engine, threads=None, cache_interval=3, cache_schedule="nonuniform")
    assert (calls["unet"], calls["unet shallow"]) == (3, 4)


def test_plans_and_the_rows_rule():
    assert full_steps(7, 3) == (0, 3, 6)
    assert full_steps(5, 1) == (0, 1, 2, 3, 4)
    for steps, interval in ((50, 5), (25, 3), (10, 2), (4, 3), (3, 5)):
        uniform, dense = full_steps(steps, interval), full_steps(steps, interval, "nonuniform")
        assert len(dense) == len(uniform) and dense[0] == 0 and dense[-1] < steps
        assert all(b > a for a, b in zip(dense, dense[1:]))
    dense = full_steps(50, 5, "nonuniform")
    gaps = np.diff(dense)
    assert gaps[0] < 5 < gaps[-1]  # denser early than every 5th, sparser late
    cache = FeatureCache.plan(4, 2)
    assert cache.feature_for(4) is None  # step 0: full
    feature = np.arange(4, dtype=np.float32).reshape(4, 1)  # 2n = 4 rows: [uncond, cond]
    cache.record(feature)
    np.testing.assert_array_equal(cache.feature_for(4), feature)
    np.testing.assert_array_equal(cache.feature_for(2), feature[2:])  # unguided: the cond rows
    cache.record(None)
    assert cache.feature_for(2) is None  # step 2: full (planned)
    cache.record(feature[2:])  # an unguided full step keeps n rows
    assert cache.feature_for(4) is None  # a guided step after it refreshes
    assert cache.calls == {"full": 2, "shallow": 1}


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "3", 10_000])
def test_bad_cache_interval_values(value):
    with pytest.raises(InputError, match="--cache-interval must be an integer from 1"):
        check_cache_interval(value)


@pytest.mark.parametrize("args, needle", [
    (("--cache-interval", "0"), "error: --cache-interval must be an integer from 1"),
    (("--cache-interval", "-1"), "error: --cache-interval must be an integer from 1"),
    (("--cache-interval", "3"), "error: --cache-interval above 1 needs the DeepCache graphs"),
    (("--cache-interval", "2.5"), "'2.5' is not a valid integer"),
    (("--cache-schedule", "sometimes"), "'sometimes' is not one of"),
])
def test_cli_bad_cache_options_are_one_line(without_cache, tmp_path, args, needle):
    from click.testing import CliRunner

    from apla_rt.cli import main

    out = tmp_path / "v.mp4"
    result = CliRunner().invoke(main, ["generate", "--engine-dir", str(without_cache), "--prompt", "a man",
                                       "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ") or "Error: " in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_serve_request_cache_fields(exported, without_cache):
    require("ray.serve")
    from apla_rt import Pipeline
    from apla_rt.service.serve import parse_generate

    _, engine = exported
    with Pipeline.open(engine) as pipe:
        request, _ = parse_generate(b'{"prompt": "a man", "cache_interval": 3, "cache_schedule": "nonuniform"}',
                                    pipe, False)
        assert (request.settings.cache_interval, request.settings.cache_schedule) == (3, "nonuniform")
        assert pipe.settings_for(parse_generate(b'{"prompt": "a man"}', pipe, False)[0].settings).cache_interval == 1
        for body, needle in ((b'{"prompt": "a", "cache_interval": 0}', "--cache-interval must be"),
                             (b'{"prompt": "a", "cache_interval": 2.5}', "--cache-interval must be an integer"),
                             (b'{"prompt": "a", "cache_schedule": "x"}', "--cache-schedule must be one of")):
            with pytest.raises(InputError, match=needle):
                parse_generate(body, pipe, False)
    with Pipeline.open(without_cache) as pipe:
        with pytest.raises(InputError, match="needs the DeepCache graphs"):
            parse_generate(b'{"prompt": "a", "cache_interval": 2}', pipe, False)


def test_cache_share_script_on_the_exported_graphs(exported):
    """benchmarks/cache_share.py's ONNX Runtime half on the tiny folder: the report's keys and
    the shallow graph's agreement (its times are benchmark figures, never asserted)."""
    import subprocess
    import sys

    _, engine = exported
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_share.py"
    proc = subprocess.run([sys.executable, str(script), "--engine-dir", str(engine), "--frames", "4",
                           "--repeat", "1", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)["engine_dir_onnxruntime"]
    assert report["shallow_vs_full_max_abs"] <= 1e-5
    assert report["full_s"] > 0 and report["shallow_s"] > 0 and report["share"] > 0
