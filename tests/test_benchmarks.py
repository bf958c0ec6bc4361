"""benchmarks/rt_vs_torch.py on a real tiny exported run: the JSON report's keys, medians of
alternating pairs, and the two samplers' agreement. Its speed figures are recorded in
docs/benchmarks.md, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rt_vs_torch.py"

pytestmark = pytest.mark.slow


def test_rt_vs_torch_json_report(exported):
    run, engine = exported
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run), "--engine-dir", str(engine),
                           "--steps", "2", "--repeat", "2", "--threads", "2", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    for key in ("torch_s", "rt_s", "speedup", "max_abs_latent_diff", "process_speedup",
                "torch_peak_rss_mib", "rt_peak_rss_mib", "rt_stages_s", "runs"):
        assert key in report, key
    assert report["max_abs_latent_diff"] < 1e-3
    assert report["frames_psnr_db"] is None or report["frames_psnr_db"] >= 40  # None: identical
    assert report["repeat"] == 2 and len(report["runs"]) == 2
    ratios = sorted(r["torch_s"] / r["rt_s"] for r in report["runs"])
    assert ratios[0] - 0.01 <= report["speedup"] <= ratios[1] + 0.01  # the median of the pairs
    assert report["steps"] == 2 and report["rt_backend"].startswith("onnxruntime-cpu")
    stages = report["rt_stages_s"]
    assert stages["unet"] > 0 and stages["load"] > 0 and stages["total"] < report["rt_process_s"]


def test_rt_vs_torch_refuses_a_bad_repeat(exported):
    run, engine = exported
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run), "--engine-dir", str(engine),
                           "--repeat", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--repeat must be at least 1" in proc.stderr
