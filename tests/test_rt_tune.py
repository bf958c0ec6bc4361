"""``apla-rt tune``: the search's rules on made-up scores, then real tunes of the session's
exported tiny run (a copy of its engine folder) with a small grid: the chosen setting is within
the budget of DDIM 50 fp32 in every case it was tuned on (recomputed here, not read back),
``generate`` and the API take it by default and ``--exact`` does not, a killed tune continues
when rerun, and bad options are one line. Timings are never asserted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from apla_rt import Pipeline
from apla_rt.api import tuned_line
from apla_rt.cli import main
from apla_rt.folder.manifest import Manifest
from apla_rt.media.video import psnr
from apla_rt.sampling.settings import SamplingSettings
from apla_rt.tune import search as search_module
from apla_rt.tune.options import Case, Grid, label
from apla_rt.tune.search import Progress, Search, Units, seconds_of

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_STEPS = 60
# wide: against a 60-step reference nothing under 50 steps comes within 1 dB of DDIM 50 on the
# 6-step tiny run; within 10 dB settings of 20 steps do
BUDGET_DB = 10.0
GRID = ["--solvers", "ddim,unipc", "--steps", "5,10,20", "--cache-intervals", "1,2",
        "--reference-steps", str(REFERENCE_STEPS), "--threads", "2", "--minutes", "20"]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def machine_entry(folder: Path) -> dict:
    machines = json.loads((folder / "tuned.json").read_text())["machines"]
    assert len(machines) == 1
    return next(iter(machines.values()))


# --------------------------------------------------------------------------- the search's rules


class ScoredBench:
    """Runs nothing: a setting's "frames" carry the PSNR and seconds ``score`` gives it."""

    def __init__(self, score):
        self.score = score
        self.runs: list[str] = []

    def run(self, case, s, bar=None):
        db, seconds = self.score(case, s)
        self.runs.append(f"{label(s)} / {case.name}")
        return np.array([db]), seconds


def made_up_score(case: Case, s: SamplingSettings) -> tuple[float, float]:
    """unipc gains 1 dB a step, ddim 0.5 dB; each cache interval step costs 3 dB (the edit case
    4); the time is the UNet calls, a cached step 0.6 of a full one."""
    per_step = 1.0 if s.solver == "unipc" else 0.5
    base = 40.0 if s.solver == "unipc" else 30.0
    cache = (s.cache_interval - 1) * (4.0 if case.name == "edit" else 3.0)
    seconds = s.steps * (1.0 if s.cache_interval == 1 else 0.6)
    return base + per_step * s.steps - cache, seconds


def test_search_picks_the_fastest_passing_and_skips_what_cannot_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "psnr", lambda frames, ref: float(frames[0]))
    cases = [Case("recon", "p", False, 500), Case("edit", "q", False, 500)]
    progress = Progress(tmp_path, {"machine": {"cpu": "test"}})
    lines: list[str] = []
    search = Search(progress, cases, 1.0, time.monotonic() + 600, lambda d, n: search_module.Bar(), lines.append)
    search.references = {c.name: np.zeros(1) for c in cases}
    bench = ScoredBench(made_up_score)
    ddim50 = SamplingSettings(steps=50, solver="ddim", cache_interval=1, cache_schedule="uniform")
    search.baseline(bench, ddim50)
    assert search.bar_db == {"recon": 55.0, "edit": 55.0}
    candidates = Grid(("ddim", "unipc"), (10, 15, 20, 30), (1, 2), ("uniform",)).candidates(500, True, ddim50)
    skipped = search.run_mode(bench, "fp32", candidates, Units(full=1.0, shallow=0.6, step=0.0, fixed=0.0))
    best_label, best = search.best("fp32")
    # unipc 15 (55 dB, 15 s) passes; unipc 20 cache 2 (60 - 3 / 60 - 4 dB, 12 s) passes faster
    assert best_label == "unipc 20, cache 2 uniform" and seconds_of(best) == 12.0
    assert search.verdict(progress.find("fp32", candidates[0])) == "passed"  # the baseline
    assert search.verdict(progress.find("fp32", SamplingSettings(
        steps=10, solver="unipc", cache_interval=1, cache_schedule="uniform"))).startswith("missed")
    # a cached setting whose uncached one missed never runs; nor one estimated slower than the best
    assert skipped["missed without the cache"] >= 3 and skipped["estimated slower than the best passing"] >= 1
    assert not any(r.startswith(("ddim 10, cache", "unipc 10, cache")) for r in bench.runs)
    assert not any(r.startswith("unipc 30 /") for r in bench.runs)
    # a setting that missed stopped at its first missed case
    assert sum(r.startswith("ddim 10 /") for r in bench.runs) == 1
    # the kept rows survive a new Progress on the same folder and key; another key starts afresh
    assert Progress(tmp_path, {"machine": {"cpu": "test"}}).runs == progress.runs > 0
    assert Progress(tmp_path, {"machine": {"cpu": "test"}, "reference_steps": 7}).runs == 0
    # in auto, what missed in fp32 is not run again
    bench.runs.clear()
    search.run_mode(bench, "auto", candidates, Units(full=1.0, shallow=0.6, step=0.0, fixed=0.0))
    assert not any(r.startswith(("unipc 10 /", "ddim 10 /")) for r in bench.runs)


def test_search_out_of_time_keeps_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "psnr", lambda frames, ref: float(frames[0]))
    cases = [Case("noise", "p", True, 999)]
    search = Search(Progress(tmp_path, {"machine": {}}), cases, 1.0, time.monotonic() + 600,
                    lambda d, n: search_module.Bar(), lambda line: None)
    search.references = {"noise": np.zeros(1)}
    bench = ScoredBench(made_up_score)
    ddim50 = SamplingSettings(steps=50, solver="ddim", cache_interval=1, cache_schedule="uniform")
    search.baseline(bench, ddim50)
    search.deadline = time.monotonic() - 1
    skipped = search.run_mode(bench, "fp32", Grid(("unipc",), (20,), (1,)).candidates(999, False, ddim50),
                              Units(1.0, 0.5, 0.0, 0.0))
    assert skipped == {"out of time": 2} and search.stopped == "out of time"
    assert search.best("fp32")[0] == "ddim 50"


def test_auto_takes_the_fp32_setting_where_the_placement_found_nothing_faster():
    from apla_rt.tune.run import _Tune

    fp32 = {"setting": "unipc 30, cache 2 uniform", "seconds": 6.48}
    assert _Tune.fp32_for_auto({}) is None  # nothing measured in fp32: nothing to fall back on
    assert "no setting in the measured placement" in _Tune.fp32_for_auto({"fp32": fp32})
    slower = _Tune.fp32_for_auto({"fp32": fp32, "auto": {"setting": "unipc 30", "seconds": 7.81}})
    assert slower == "the measured placement's best (unipc 30, 7.81 s) measured slower"
    assert _Tune.fp32_for_auto({"fp32": fp32, "auto": {"setting": "unipc 20", "seconds": 5.0}}) is None


def test_grid_fits_the_start_and_the_folder():
    base = SamplingSettings(steps=50, solver="ddim", cache_interval=1, cache_schedule="uniform")
    got = Grid(("unipc",), (10, 40, 60), (1, 3)).candidates(45, True, base)
    assert [label(s) for s in got] == ["ddim 50", "unipc 10", "unipc 10, cache 3 uniform",
                                       "unipc 10, cache 3 nonuniform", "unipc 40",
                                       "unipc 40, cache 3 uniform", "unipc 40, cache 3 nonuniform"]
    assert [label(s) for s in Grid(("unipc",), (10,), (1, 3)).candidates(45, False, base)] == ["ddim 50", "unipc 10"]


# --------------------------------------------------------------------------- real tunes


@dataclass
class Tuned:
    folder: Path
    entry: dict
    result: Any  # the CLI's result of the run that finished the tune
    killed: int  # the return code of the first run, killed by its pid
    kept: dict  # its progress.json when it was killed


@pytest.fixture(scope="module")
def tuned(exported, tmp_path_factory) -> Tuned:
    """The exported tiny run's engine folder, copied and tuned: a first ``apla-rt tune`` in a
    subprocess killed once it has kept a run, then the same command to the end."""
    _, engine = exported
    folder = tmp_path_factory.mktemp("tuned") / "engine"
    shutil.copytree(engine, folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = ["tune", "--engine-dir", str(folder), *GRID, "--budget-db", str(BUDGET_DB)]
    proc = subprocess.Popen([sys.executable, "-m", "apla_rt.cli", *args, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list(folder.glob(".tune-*/progress.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        assert proc.poll() is None, "the tune ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    kept = json.loads(next(folder.glob(".tune-*/progress.json")).read_text())
    assert not (folder / "tuned.json").exists()
    result = run(*args)
    assert result.exit_code == 0, result.output
    return Tuned(folder, machine_entry(folder), result, proc.returncode, kept)


def test_the_tuned_setting_is_within_budget_in_every_case(tuned):
    folder, entry, result = tuned.folder, tuned.entry, tuned.result
    assert entry["complete"] and entry["budget_db"] == BUDGET_DB
    assert entry["reference"] == {"solver": "ddim", "steps": REFERENCE_STEPS, "precision": "fp32"}
    assert [c["name"] for c in entry["cases"]] == ["recon", "edit", "noise"]
    assert "fp32: " in result.stderr and "wrote" in result.stderr
    chosen = entry["modes"]["fp32"]
    assert chosen["setting"] != entry["baseline"]["setting"], chosen["table"]
    settings = SamplingSettings.from_dict(chosen["settings"])
    assert settings.guidance is None  # the run's guidance stays the run's
    assert entry["modes"]["auto"]["settings"] == chosen["settings"] or not entry["one_mode"]
    passed = [r for r in chosen["table"] if r["verdict"] == "passed"]
    assert passed and all(r["seconds"] >= chosen["seconds"] for r in passed)
    # recomputed here: the reference, DDIM 50 and the chosen setting from each case's start
    with Pipeline.open(folder, "auto", 2, cache=True, exact=True) as pipe:
        for case in entry["cases"]:
            def frames(s: SamplingSettings) -> np.ndarray:
                video, = pipe.generate(case["prompt"], 0, from_noise=case["name"] == "noise", settings=s)
                assert video.start_timestep == case["start_timestep"]
                return video.frames

            ref = frames(SamplingSettings(steps=REFERENCE_STEPS, solver="ddim", cache_interval=1))
            ddim50 = psnr(frames(SamplingSettings(steps=50, solver="ddim", cache_interval=1)), ref)
            got = psnr(frames(settings), ref)
            assert got >= ddim50 - BUDGET_DB, (case["name"], got, ddim50)
            assert abs(got - chosen["psnr"][case["name"]]) < 0.05
            assert abs(ddim50 - entry["baseline"]["psnr"][case["name"]]) < 0.05


def test_generate_uses_the_tuned_setting_and_exact_does_not(tuned, tmp_path):
    folder, entry = tuned.folder, tuned.entry
    chosen = SamplingSettings.from_dict(entry["modes"]["auto"]["settings"])
    out, exact = tmp_path / "tuned", tmp_path / "exact"
    out.mkdir()
    exact.mkdir()
    result = run("generate", "--engine-dir", folder, "--prompt", "a man is skiing", "--out", f"{out}/",
                 "--threads", "2")
    assert result.exit_code == 0, result.output
    assert "the setting apla-rt tune chose for this model on this machine" in result.stderr
    assert f"{chosen.solver} {chosen.steps} steps" in result.stderr
    record, = json.loads((out / "index.json").read_text())
    assert (record["scheduler"], record["steps"], record["cache_interval"]) == (
        chosen.solver, chosen.steps, chosen.cache_interval)
    assert record["tuned"] == "auto"
    result = run("generate", "--engine-dir", folder, "--prompt", "a man is skiing", "--out", f"{exact}/",
                 "--threads", "2", "--exact")
    assert result.exit_code == 0, result.output
    assert "apla-rt tune chose" not in result.stderr
    record, = json.loads((exact / "index.json").read_text())
    run_steps = Manifest.open(folder).sampling_defaults().steps
    assert (record["scheduler"], record["steps"], record["tuned"]) == ("ddim", run_steps, None)
    assert run_steps != chosen.steps
    info = run("info", "--engine-dir", folder)
    assert f"tuned here (2 threads): auto: {entry['modes']['auto']['setting']}" in info.stdout
    with Pipeline.open(folder, threads=2) as pipe:  # the API, and what serve's /info returns
        summary = pipe.summary()
        assert summary["tuned"]["mode"] == "auto" and summary["tuned"]["budget_db"] == BUDGET_DB
        assert (summary["scheduler"], summary["steps"]) == (chosen.solver, chosen.steps)
    with Pipeline.open(folder, threads=1) as pipe:  # tuned for 2 threads: another key
        assert pipe.tuned is None and pipe.summary()["tuned"] is None


def test_auto_runs_fp32_where_nothing_in_the_measured_placement_stayed_within_budget(tuned, tmp_path):
    """A tune whose measured placement ran and had no setting within the budget records the fp32
    search's setting for ``auto`` too, to run in fp32 (as on the SD-shaped model, where bf16
    DDIM 50 itself missed): the default then opens the networks in fp32, not in the placement."""
    folder = tmp_path / "engine"
    shutil.copytree(tuned.folder, folder)
    data = json.loads((folder / "tuned.json").read_text())
    entry = next(iter(data["machines"].values()))
    fp32 = {k: v for k, v in entry["modes"]["fp32"].items() if k not in ("table", "skipped")}

    def auto_entry(**extra) -> None:
        entry["modes"]["auto"] = {**fp32, **extra}
        (folder / "tuned.json").write_text(json.dumps(data))

    auto_entry()  # a setting of the measured placement's own
    with Pipeline.open(folder, threads=2) as pipe:
        assert all("measured" in c.why for c in pipe.placement.networks.values()), pipe.placement
    auto_entry(same_as="fp32", precision="fp32", why="none within", table=[], skipped={})
    with Pipeline.open(folder, threads=2) as pipe:
        assert pipe.placement.describe_precision() == "fp32"
        assert not any("measured" in c.why for c in pipe.placement.networks.values()), pipe.placement
        assert pipe.defaults.to_dict() == SamplingSettings.from_dict(fp32["settings"]).over(
            pipe.manifest.sampling_defaults()).to_dict()
        assert "in fp32: none within" in tuned_line(pipe)


def test_a_tuned_folder_is_tuned_again_only_with_force(tuned):
    assert_user_error(run("tune", "--engine-dir", tuned.folder, *GRID), "pass --force to tune again")


def test_a_killed_tune_continues_where_it_stopped(tuned):
    assert tuned.killed == -signal.SIGKILL and tuned.kept["references"], tuned.kept
    resumed = [line for line in tuned.result.stderr.splitlines() if line.startswith("resuming: ")]
    assert resumed and int(resumed[0].split()[1]) >= len(tuned.kept["references"]), tuned.result.stderr
    assert tuned.entry["complete"] and not list(tuned.folder.glob(".tune-*"))


def test_out_of_time_before_anything_is_measured_says_so(exported, tmp_path):
    _, engine = exported
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    result = run("tune", "--engine-dir", folder, "--minutes", "0.0001", "--reference-steps", "10", "--quiet")
    assert_user_error(result, "rerun to continue")
    assert not (folder / "tuned.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--budget-db", "abc"], "--budget-db must be a positive number of dB, got 'abc'"),
    (["--budget-db", "-1"], "--budget-db must be a positive number"),
    (["--minutes", "0"], "--minutes must be a positive number of minutes"),
    (["--steps", "ten"], "--steps must be a comma-separated list"),
    (["--steps", "0,10"], "--steps must be an integer from 1"),
    (["--solvers", "euler"], "euler"),
    (["--cache-intervals", "1,0"], "--cache-intervals must be an integer from 1"),
    (["--edit-prompt", " "], "--edit-prompt must not be empty"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_tune_bad_options_are_one_line(fake_engine, extra, message):
    assert_user_error(run("tune", "--engine-dir", fake_engine, *extra), message)
    assert not (fake_engine / "tuned.json").exists()


def test_tune_needs_an_engine_folder(tmp_path):
    assert_user_error(run("tune", "--engine-dir", tmp_path / "missing"), "missing")


def test_fastest_benchmark_reads_the_tuned_setting(tuned, exported, tmp_path):
    """benchmarks/fastest.py on the tuned tiny folder (tuned at 2 threads: no tune runs): every
    row runs, the tuned rows sample with the tuned settings, the distances are measured."""
    folder, entry = tuned.folder, tuned.entry
    run_dir, _ = exported
    out = tmp_path / "fastest.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fastest.py"), "--tiny",
                           f"{run_dir}={folder}", "--ddim-steps", "3", "--reference-steps", "8",
                           "--threads", "2", "--json", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, = json.loads(out.read_text())["models"]
    assert model["tune_s"] is None and model["tuned"]["modes"]["auto"]["setting"] == entry["modes"]["auto"]["setting"]
    rows = model["rows"]
    assert [r for r in rows.values() if "error" in r] == []
    assert rows["apla-rt tuned"]["setting"] == entry["modes"]["auto"]["setting"]
    assert rows["apla-rt tuned fp32"]["setting"] == entry["modes"]["fp32"]["setting"]
    assert rows["apla-rt --exact"]["setting"] == "ddim 3" == rows["torch fp32"]["setting"]
    # the PyTorch sampler and ONNX Runtime fp32 at the same setting: the same frames
    assert abs(rows["torch fp32"]["psnr_ref_db"] - rows["apla-rt --exact"]["psnr_ref_db"]) < 0.5
    assert all("held_out_psnr_ref_db" in rows[r] for r in ("apla-rt --exact", "apla-rt tuned"))
    assert "held-out (noise, seed 1)" in proc.stdout and "x torch" in proc.stdout
