"""``--backend openvino`` and ``--precision`` on the session's exported tiny run (``exported``).

OpenVINO fp32 against ONNX Runtime fp32 (the exact reference) per network and for a short
generate; the bf16 decision logic with a fake CPU probe (no units: refused in one line naming
the flag, ``auto`` keeps ONNX Runtime fp32; check pass / miss -> fp32 and one line; the verdict
cache's key); bf16 itself where this CPU and OpenVINO have it; the compiled-model cache; the
CLI's bad input. Every test points the user cache folder at a temporary one.
"""

from __future__ import annotations

import re

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require

require("openvino")

from apla_rt import Pipeline  # noqa: E402
from apla_rt.backends import openvino as openvino_runner, precision as cpu_precision  # noqa: E402
from apla_rt.cli import main  # noqa: E402
from apla_rt.backends.compare import compare_outputs, seeded_feeds  # noqa: E402
from apla_rt.backends.precision import CpuInfo, VerdictCache  # noqa: E402
from apla_rt.errors import AplaError, BackendUnavailable  # noqa: E402
from apla_rt.folder.manifest import Manifest  # noqa: E402
from apla_rt.backends.runners import open_runner  # noqa: E402

NO_BF16 = CpuInfo("Fake EPYC without bf16", frozenset({"avx2", "fma", "avx512f"}))
WITH_BF16 = CpuInfo("Fake Xeon with AMX", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
AVX512_BF16_ONLY = CpuInfo("Fake Xeon with avx512_bf16, no AMX",
                           frozenset({"avx2", "avx512f", "avx512_bf16", "avx_vnni"}))
FP32_TOL = 1e-4  # OpenVINO fp32 vs ONNX Runtime fp32 (measured 1.5e-6 on the tiny UNet)
TINY_BF16_PSNR_DB = 40.0  # the tiny model's bf16 video vs fp32 (measured 47-49 dB; docs/cpu.md)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("apla-cache")


@pytest.fixture(autouse=True)
def _cache_in_tmp(shared_cache, monkeypatch):
    """Compiled models and verdicts go to a temporary folder, shared by the module's tests."""
    monkeypatch.setenv(cpu_precision.CACHE_ENV, str(shared_cache))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_precision.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_cpu(monkeypatch, cpu: CpuInfo, caps: tuple[str, ...] = ("FP32", "BF16")) -> None:
    monkeypatch.setattr(cpu_precision, "probe_cpu", lambda: cpu)
    monkeypatch.setattr(openvino_runner, "ov_capabilities", lambda: caps)


def this_cpu_bf16() -> str | None:
    return cpu_precision.bf16_unavailable(cpu_precision.probe_cpu(), openvino_runner.ov_capabilities())


@pytest.fixture(scope="module")
def manifest(exported) -> Manifest:
    return Manifest.open(exported[1])


def _feeds(manifest: Manifest, name: str, seed: int) -> dict[str, np.ndarray]:
    spec = manifest.network(name)
    ids = openvino_runner.prompt_token_ids(manifest) if "input_ids" in spec.input_names else None
    return seeded_feeds(spec, seed, ids, manifest.scheduler.num_train_timesteps)


# --------------------------------------------------------------------------- fp32 parity


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vgt", "vae_decoder", "vae_encoder"])
def test_openvino_fp32_matches_onnxruntime(manifest, name):
    ort = open_runner(manifest, name, "ort", threads=2)
    ov = open_runner(manifest, name, "openvino", threads=2, precision="fp32")
    assert isinstance(ov, openvino_runner.OvRunner)
    assert ov.backend == "openvino-cpu" and ov.precision == "fp32"
    for seed in (0, 1):
        feeds = _feeds(manifest, name, seed)
        ref, got = ort.run(feeds), ov.run(feeds)
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape
            assert float(np.abs(got[key] - ref[key]).max()) <= FP32_TOL, (name, key)
    ort.close()
    ov.close()


def test_openvino_generate_matches_onnxruntime(exported):
    """A guided generate (threads=2: the guidance halves on two infer requests side by side,
    the text pinned otherwise) gives ONNX Runtime's video."""
    _, engine = exported
    results = {}
    for backend, threads in (("ort-cpu", 2), ("openvino", 2), ("openvino", 1)):
        with Pipeline.open(engine, backend, threads, precision="fp32") as pipe:
            assert pipe.placement.split_guidance == (threads == 2)
            video, = pipe.generate("a man is skiing", steps=3)
            results[(backend, threads)] = video
            assert pipe.describe_precision() == "fp32"
            assert pipe.summary()["precision"] == "fp32"
            if backend == "openvino":
                assert pipe.describe().startswith("openvino-cpu (")
                assert pipe.engine.timings.calls["unet"] == 3 and pipe.engine.timings.seconds["vae"] > 0
    ref = results[("ort-cpu", 2)]
    for key in (("openvino", 2), ("openvino", 1)):
        got = results[key]
        assert float(np.abs(got.latents - ref.latents).max()) <= FP32_TOL
        assert int(np.abs(got.frames.astype(int) - ref.frames).max()) <= 1


def test_openvino_chunks_by_the_profile(manifest, monkeypatch):
    """A call larger than the profile's max is split by the engine like ONNX Runtime's: in
    calls the profile takes, every frame decoded once and in order (each frame against ONNX
    Runtime's decode of that frame alone)."""
    from apla_rt.engine import Engine
    from apla_rt.media.video import images_to_frames

    sizes: list[int] = []
    run = openvino_runner.OvRunner.run

    def counting(self, feeds):
        sizes.append(next(iter(feeds.values())).shape[0])
        return run(self, feeds)

    monkeypatch.setattr(openvino_runner.OvRunner, "run", counting)
    with Engine.open(manifest, "openvino", ("vae_decoder",), precision="fp32") as engine:
        hi = manifest.network("vae_decoder").profile["frames"][2]
        z = np.random.default_rng(0).standard_normal((1, 4, hi + 2, 8, 8)).astype(np.float32)
        frames = engine.decode(z)
        assert frames.shape[0] == hi + 2 and engine.timings.calls["vae"] == 1
    assert sum(sizes) == hi + 2 and len(sizes) > 1 and max(sizes) <= hi, sizes
    ort = open_runner(manifest, "vae_decoder", "ort", threads=2)
    latents = z[0].transpose(1, 0, 2, 3)
    want = images_to_frames(np.concatenate([ort.run({"latent": latents[i:i + 1]})["image"]
                                            for i in range(hi + 2)]))
    ort.close()
    # fp32 outputs within FP32_TOL round to the same uint8 level or the next one (as the
    # generate test above; measured: all equal); neighbouring frames differ by up to 255
    assert int(np.abs(frames.astype(int) - want).max()) <= 1


def test_tampered_file_is_refused(exported, tmp_path):
    import shutil

    from apla_rt.errors import IntegrityError

    engine = tmp_path / "engine"
    shutil.copytree(exported[1], engine)
    with open(engine / "vgt.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match="vgt.onnx does not match its sha256"):
        open_runner(Manifest.open(engine), "vgt", "openvino", precision="fp32")


# --------------------------------------------------------------------------- model cache


def test_model_cache_second_open_loads_the_blob(manifest, fresh_cache):
    onnx = manifest.network("unet").onnx
    assert onnx is not None
    sha = manifest.files[manifest.rel(onnx)]
    first = open_runner(manifest, "unet", "openvino", threads=2, precision="fp32")
    folder = fresh_cache / "openvino" / sha / "fp32"
    assert list(folder.glob("*.blob")), "OpenVINO wrote no compiled blob"
    second = open_runner(manifest, "unet", "openvino", threads=2, precision="fp32")
    assert isinstance(first, openvino_runner.OvRunner) and isinstance(second, openvino_runner.OvRunner)
    assert not first.loaded_from_cache and second.loaded_from_cache
    feeds = _feeds(manifest, "unet", 3)
    np.testing.assert_array_equal(first.run(feeds)["noise_pred"], second.run(feeds)["noise_pred"])


@pytest.mark.parametrize("name", ["unet", "vgt"])
def test_bf16_never_loads_the_fp32_blob(manifest, fresh_cache, name):
    """fp32, then bf16, of one file with the same cache: OpenVINO 2026.4 names the blob without
    the precision, and a bf16 compile that loaded the fp32 blob answered NaN or crashed (an
    AMX Xeon, SD-shaped model). Each precision compiles into a folder of its own and computes
    what an uncached compile computes."""
    why = this_cpu_bf16()
    if why is not None:
        pytest.skip(f"bf16 does not run here: {why}")
    spec = manifest.network(name)
    assert spec.onnx is not None
    cache = fresh_cache / "openvino" / manifest.files[manifest.rel(spec.onnx)]
    feeds = _feeds(manifest, name, 4)
    fp32 = openvino_runner.OvRunner(spec, spec.onnx, "fp32", 2, cache=cache)
    fp32.run(feeds)
    bf16 = openvino_runner.OvRunner(spec, spec.onnx, "bf16", 2, cache=cache)
    assert not bf16.loaded_from_cache
    assert list((cache / "fp32").glob("*.blob")) and list((cache / "bf16").glob("*.blob"))
    uncached = openvino_runner.OvRunner(spec, spec.onnx, "bf16", 2)
    got, want = bf16.run(feeds), uncached.run(feeds)
    for out in spec.output_names:
        assert np.isfinite(got[out]).all()
        np.testing.assert_array_equal(got[out], want[out])
    again = openvino_runner.OvRunner(spec, spec.onnx, "bf16", 2, cache=cache)
    assert again.loaded_from_cache
    np.testing.assert_array_equal(again.run(feeds)[spec.output_names[0]], want[spec.output_names[0]])


# --------------------------------------------------------------------------- bf16 decisions


def test_no_bf16_units_refused_in_one_line(exported, monkeypatch):
    fake_cpu(monkeypatch, NO_BF16, ("FP32", "INT8"))
    with pytest.raises(BackendUnavailable) as err:
        Pipeline.open(exported[1], "openvino", precision="bf16")
    message = str(err.value)
    assert "\n" not in message and "avx512_bf16" in message and "amx_bf16" in message
    assert "Fake EPYC" in message


def _timed(monkeypatch, seconds: dict[tuple[str, str], float], calls: list | None = None) -> None:
    """The measured choice with these call times per (backend, precision): every candidate is
    still opened, run and checked for real; only its time is replaced."""
    from apla_rt.backends import choice

    real = choice._row

    def row(manifest, name, backend, precision, *args):
        out = real(manifest, name, backend, precision, *args)
        if calls is not None:
            calls.append((name, backend, precision))
        return {**out, "seconds": seconds[(backend, precision)]}

    monkeypatch.setattr(choice, "_row", row)


def choice_table(engine, name: str) -> dict:
    """The measured table the placement of ``engine`` (an Engine or a Pipeline) came from."""
    from apla_rt.backends import choice

    cpu = cpu_precision.probe_cpu()
    table = choice.measured(engine.manifest, name, engine.placement.threads, cpu, run=False)
    assert table is not None, name
    return table


def test_auto_without_bf16_units_measures_no_bf16(exported, monkeypatch, fresh_cache):
    """A CPU without bf16 dot products: bf16 is not even a candidate; ``auto`` chooses among
    ONNX Runtime and OpenVINO fp32 by their times."""
    fake_cpu(monkeypatch, NO_BF16, ("FP32",))
    monkeypatch.setattr(openvino_runner, "bf16_verdict", lambda *a, **k: pytest.fail("no bf16 check"))
    _timed(monkeypatch, {("ort", "fp32"): 1.0, ("openvino", "fp32"): 2.0})
    with Pipeline.open(exported[1], "auto", 2) as pipe:
        assert pipe.placement.backend == "ort" and pipe.describe_precision() == "fp32"
        assert all(r.backend == "onnxruntime-cpu" for r in pipe.engine.runners.values())
        for name in pipe.engine.runners:
            assert {(r["backend"], r["precision"]) for r in choice_table(pipe, name)["rows"]} == {
                ("ort", "fp32"), ("openvino", "fp32")}
    with Pipeline.open(exported[1], "openvino", 2) as pipe:  # OpenVINO's fastest: fp32
        assert pipe.describe_precision() == "fp32" and pipe.placement.notes == ()


def test_auto_takes_the_fastest_faithful_candidate(exported, monkeypatch, fresh_cache):
    """Measured, not read off a flag: bf16 runs where it is faster and passes its check, on an
    AMX CPU or not; where it is slower, or misses its tolerance, the fastest faithful other
    candidate runs; ``--backend ort-cpu`` or ``--precision fp32`` measure nothing."""
    fake_cpu(monkeypatch, AVX512_BF16_ONLY)
    _timed(monkeypatch, {("ort", "fp32"): 1.0, ("openvino", "fp32"): 2.0, ("openvino", "bf16"): 0.5})
    with Pipeline.open(exported[1], threads=2) as pipe:
        assert pipe.placement.backend == "openvino" and pipe.describe_precision() == "bf16", pipe.describe()
        assert all(r.backend == "openvino-cpu-bf16" for r in pipe.engine.runners.values())
        assert "measured fastest faithful here (0.5 s a call, ONNX Runtime fp32 1 s)" in pipe.placement.choice("vgt").why
        video, = pipe.generate("a man is skiing")  # runs, in bf16
    info = CliRunner().invoke(main, ["info", "--engine-dir", str(exported[1]), "--threads", "2"])
    assert info.exit_code == 0, info.output
    assert "openvino-cpu-bf16" in info.output and "measured fastest faithful" in info.output
    assert re.search(r"openvino bf16 +0\.5 s  passed .*<- chosen", info.output), info.output
    from apla_rt.engine import Engine

    fake_cpu(monkeypatch, WITH_BF16)  # another machine: measured again, here bf16 is slower
    _timed(monkeypatch, {("ort", "fp32"): 1.0, ("openvino", "fp32"): 0.9, ("openvino", "bf16"): 1.2})
    with Engine.open(exported[1], "auto", ("vgt",), 2) as engine:
        assert engine.placement.choice("vgt").runner == "openvino-cpu"
    fake_cpu(monkeypatch, CpuInfo("Fake Xeon 3", WITH_BF16.flags))  # bf16 fastest but unfaithful
    monkeypatch.setattr(cpu_precision, "BF16_TOLERANCE", {"max_abs": 0.0, "rel_rms": 0.0})
    _timed(monkeypatch, {("ort", "fp32"): 1.0, ("openvino", "fp32"): 2.0, ("openvino", "bf16"): 0.1})
    with Engine.open(exported[1], "auto", ("vgt", "unet"), 2) as engine:
        opened = list(engine.runners)
        missed = {n for n in opened if not next(r["passed"] for r in choice_table(engine, n)["rows"]
                                                if r["precision"] == "bf16")}
        # a zero tolerance is met only by an exact output: where the CPU really runs bf16 every
        # network misses; elsewhere OpenVINO's bf16 hint may compute fp32 and pass
        assert missed or this_cpu_bf16() is not None
        assert all(engine.placement.choice(n).runner == "onnxruntime-cpu" for n in missed)
    calls: list = []
    _timed(monkeypatch, {}, calls)
    for backend, precision in (("ort-cpu", "auto"), ("auto", "fp32")):
        with Pipeline.open(exported[1], backend, 2, precision=precision) as pipe:
            assert pipe.placement.backend == "ort" and pipe.describe_precision() == "fp32"
    assert calls == []


def test_measured_choice_is_cached_per_machine_and_threads(exported, monkeypatch, fresh_cache):
    calls: list = []
    _timed(monkeypatch, {("ort", "fp32"): 1.0, ("openvino", "fp32"): 2.0, ("openvino", "bf16"): 3.0}, calls)
    fake_cpu(monkeypatch, WITH_BF16)
    with Pipeline.open(exported[1], threads=2) as pipe:
        opened = sorted(pipe.engine.runners)
    assert sorted({c[0] for c in calls}) == opened and len(calls) == 3 * len(opened)
    calls.clear()
    with Pipeline.open(exported[1], threads=2):
        pass
    assert calls == []  # cached: nothing measured again
    with Pipeline.open(exported[1], threads=1):
        pass
    assert sorted({c[0] for c in calls}) == opened  # another thread count: measured again


def test_the_real_measurement_chooses_its_fastest_faithful_row(exported, fresh_cache):
    """On this machine, unfaked: every candidate has a time and a verdict, and the chosen one
    is the fastest that passed."""
    with Pipeline.open(exported[1], threads=2) as pipe:
        for name in pipe.engine.runners:
            table = choice_table(pipe, name)
            passing = [r for r in table["rows"] if r["passed"]]
            assert ("ort", "fp32") in {(r["backend"], r["precision"]) for r in passing}
            best = min(passing, key=lambda r: r["seconds"])
            assert table["chosen"] == [best["backend"], best["precision"]]
            choice = pipe.placement.choice(name)
            assert (choice.backend, choice.precision) == tuple(table["chosen"])


def test_openvino_without_bf16_capability_is_refused(exported, monkeypatch):
    fake_cpu(monkeypatch, WITH_BF16, ("FP32", "INT8"))
    with pytest.raises(BackendUnavailable, match="does not report BF16"):
        Pipeline.open(exported[1], "openvino", precision="bf16")


def test_check_miss_falls_back_to_fp32_with_one_line(exported, monkeypatch, fresh_cache):
    fake_cpu(monkeypatch, WITH_BF16)
    monkeypatch.setattr(cpu_precision, "BF16_TOLERANCE", {"max_abs": 0.0, "rel_rms": 0.0})
    calls = []
    real = openvino_runner.bf16_check
    def counted(*a):
        calls.append(a[1].name)
        return real(*a)

    monkeypatch.setattr(openvino_runner, "bf16_check", counted)
    with Pipeline.open(exported[1], "openvino", 2, precision="bf16") as pipe:
        networks = sorted(pipe.engine.runners)
        # a zero tolerance is met only by an exact output: where the CPU really runs bf16 every
        # network misses; elsewhere OpenVINO's bf16 hint may compute fp32 and pass
        for line in pipe.placement.notes:
            assert line.startswith("bf16 check failed for ") and line.endswith(": it runs in fp32")
            assert "\n" not in line
        missed = {line.split()[4] for line in pipe.placement.notes}
        assert all(pipe.placement.choice(n).precision == "fp32" for n in missed)
        if this_cpu_bf16() is None:
            assert missed == set(networks)
        assert sorted(calls) == networks
        summary = pipe.summary()
        assert summary["precision_notes"] == list(pipe.placement.notes)
    assert len(VerdictCache(fresh_cache)._read()) == len(networks)
    with Pipeline.open(exported[1], "openvino", 2, precision="auto") as pipe:  # measured
        assert sorted(calls) == networks  # the forced check's verdicts are not run again
        assert all(pipe.placement.choice(n).precision == "fp32" for n in missed)


def test_verdict_cache_key_and_invalidation(exported, monkeypatch, fresh_cache):
    fake_cpu(monkeypatch, WITH_BF16)
    calls: list[str] = []
    verdict = {"passed": True, "worst": {"max_abs": 0.0, "rel_rms": 0.0},
               "tolerance": dict(cpu_precision.BF16_TOLERANCE), "checks": 2}
    def counted(*a):
        calls.append(a[1].name)
        return dict(verdict)

    monkeypatch.setattr(openvino_runner, "bf16_check", counted)
    from apla_rt.backends.placement import serving_graph

    unet = serving_graph(Manifest.open(exported[1]), "unet")  # the graph that serves the UNet
    nets = (unet, "vgt")

    def open_bf16() -> list[str]:
        from apla_rt.engine import Engine

        with Engine.open(exported[1], "openvino", ("unet", "vgt"), 2, precision="bf16") as engine:
            assert {n: engine.placement.choice(n).precision for n in nets} == {n: "bf16" for n in nets}
            assert engine.placement.notes == ()
            assert all(r.backend == "openvino-cpu-bf16" for r in engine.runners.values())
        return sorted(calls)

    assert open_bf16() == sorted(nets)  # first use on this "machine": checked
    assert open_bf16() == sorted(nets)  # cached: not checked again
    stored = VerdictCache(fresh_cache)._read()
    keys = sorted(e["key"]["network"] for e in stored.values())
    assert keys == sorted(nets)
    key = next(iter(stored.values()))["key"]
    assert set(key) == {"cpu_model", "cpu_flags", "openvino", "sha256", "network", "tolerance"}
    assert key["cpu_model"] == WITH_BF16.model and key["openvino"] == openvino_runner.ov_version()
    m = Manifest.open(exported[1])
    onnx = m.network(key["network"]).onnx
    assert onnx is not None and key["sha256"] == m.files[m.rel(onnx)]
    # another CPU (flags), another OpenVINO version, another tolerance: checked again
    fake_cpu(monkeypatch, CpuInfo(WITH_BF16.model, WITH_BF16.flags | {"amx_tile"}))
    assert open_bf16() == sorted(nets + nets)
    monkeypatch.setattr(openvino_runner, "ov_version", lambda: "0.0-other")
    assert len(open_bf16()) == 6
    monkeypatch.setattr(cpu_precision, "BF16_TOLERANCE", {"max_abs": 0.1, "rel_rms": 0.01})
    assert len(open_bf16()) == 8
    assert open_bf16() == sorted(calls) and len(calls) == 8


def test_compare_outputs_scales():
    ref = {"y": np.ones((4, 4), np.float32) * 3}
    assert compare_outputs(ref, {"y": ref["y"] * 1.01})["rel_rms"] == pytest.approx(0.01, rel=1e-3)
    small = {"y": np.full((4,), 1e-3, np.float32)}  # below unit size: absolute error
    assert compare_outputs(small, {"y": small["y"] * 2})["rel_rms"] == pytest.approx(1e-3, rel=1e-3)
    assert compare_outputs(ref, {"y": ref["y"] * np.nan})["max_abs"] == float("inf")


def test_bf16_runs_here_within_tolerance(exported, fresh_cache):
    """Where this CPU and OpenVINO report bf16: every network runs bf16 (OpenVINO says so, and
    the outputs differ from fp32) and passes the check."""
    why = this_cpu_bf16()
    if why is not None:
        pytest.skip(f"bf16 does not run here: {why}")
    with Pipeline.open(exported[1], "openvino", 2, precision="bf16") as pipe:
        assert pipe.placement.notes == (), pipe.placement.notes
        assert pipe.describe_precision() == "bf16"
        unet = pipe.engine.pool.runner("unet")
        assert isinstance(unet, openvino_runner.OvRunner)
        assert "bfloat16" in str(unet.compiled.get_property("INFERENCE_PRECISION_HINT"))
        video, = pipe.generate("a man is skiing", steps=2)
    with Pipeline.open(exported[1], "ort-cpu", 2, precision="fp32") as pipe:
        ref, = pipe.generate("a man is skiing", steps=2)
    from apla_rt.media.video import psnr

    err = float(np.abs(video.latents - ref.latents).max())
    assert 0 < err < 0.5  # bf16 really ran (not bit-equal), and stayed close
    assert psnr(ref.frames, video.frames) >= TINY_BF16_PSNR_DB
    verdicts = VerdictCache(fresh_cache)._read().values()
    assert len(verdicts) == 4 and all(v["passed"] for v in verdicts)


# --------------------------------------------------------------------------- CLI


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output


def test_cli_bad_precision_input(exported, tmp_path, monkeypatch):
    engine = exported[1]
    out = tmp_path / "a.mp4"
    base = ("generate", "--engine-dir", engine, "--prompt", "a man is skiing", "--out", out)
    _one_line_error(_cli(*base, "--precision", "bf16", "--backend", "ort-cpu"),
                    "--precision bf16 runs on --backend openvino only")
    fake_cpu(monkeypatch, NO_BF16, ("FP32",))
    _one_line_error(_cli(*base, "--precision", "bf16"), "avx512_bf16")
    _one_line_error(_cli("invert", exported[0] / "sample.mp4", "--engine-dir", engine, "--out",
                         tmp_path / "z.npy", "--precision", "bf16"), "no bf16 matrix units")
    result = _cli(*base, "--precision", "half")
    assert result.exit_code == 2 and "Invalid value for '--precision'" in result.output
    assert not out.exists()


def test_cli_says_backend_and_precision(exported, tmp_path):
    out = tmp_path / "videos"
    result = _cli("generate", "--engine-dir", exported[1], "--prompt", "a man is skiing", "--out",
                  f"{out}/", "--from-noise", "--seed", 1, "--seed", 2, "--steps", 2,
                  "--backend", "openvino", "--precision", "fp32", "--threads", 2)
    assert result.exit_code == 0, result.output
    assert "backend openvino-cpu (requested), precision fp32" in result.output
    index = json.loads((out / "index.json").read_text())
    assert [e["precision"] for e in index] == ["fp32", "fp32"]
    assert all(e["backend"].startswith("openvino-cpu") for e in index)


def test_unknown_precision_in_the_api(exported):
    with pytest.raises(AplaError, match="--precision must be one of"):
        Pipeline.open(exported[1], precision="fp16")


def test_cpu_backends_benchmark_runs(exported, tmp_path):
    """benchmarks/cpu_backends.py end to end on the tiny run (one call each, no PyTorch side)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_backends.py"
    spec = importlib.util.spec_from_file_location("cpu_backends", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "report.json"
    assert bench.main(["--engine-dir", str(exported[1]), "--repeat", "1", "--warmup", "0",
                       "--steps", "1", "--tolerance-seeds", "1", "--no-torch", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["model"] and "flags" in report["machine"]
    unet = report["networks"]["unet"]
    assert unet["ort-fp32_call_s"] > 0 and unet["openvino-fp32_from_cache_warm"] is True
    assert unet["openvino-fp32_from_cache_cold"] is False
    gen = report["generate"]
    assert gen["openvino-fp32"]["latent_rmse_vs_ort_fp32"] <= FP32_TOL
    if report["bf16_unavailable"] is None:
        assert gen["openvino-bf16"]["psnr_db_vs_ort_fp32"] >= TINY_BF16_PSNR_DB
        assert 0 < unet["bf16_error"]["rel_rms"] <= cpu_precision.BF16_TOLERANCE["rel_rms"]


def test_openvino_invert_matches_onnxruntime(exported):
    run, engine = exported
    latents = {}
    for backend in ("ort-cpu", "openvino"):
        with Pipeline.open(engine, backend, 2, for_inversion=True, precision="fp32") as pipe:
            latents[backend] = pipe.invert(run / "sample.mp4", steps=2, stride=1).start
    assert float(np.abs(latents["openvino"] - latents["ort-cpu"]).max()) <= FP32_TOL
