"""Issue 10's chain at Stable Diffusion 1.5's size: train -> export -> generate on an
SD-1.5-shaped random folder (benchmarks/make_sd_shaped.py), through benchmarks/sd_scale.py,
with its targets as assertions. About 30 minutes and 7 GiB on a 2-core machine: it runs only
when asked for (``pytest -m sdscale``), never in the default suite.

``APLA_SD15_FOLDER`` may name an SD-1.5-shaped folder written earlier by make_sd_shaped.py
(same seed, same weights) to save writing a new one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.sdscale


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if "sdscale" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the SD-size chain runs only with -m sdscale")


def test_sd_scale_chain_meets_the_targets(tmp_path):
    out = tmp_path / "sd_scale.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "sd_scale.py"), "--work", str(tmp_path / "work"),
           "--json", str(out)]
    folder = os.environ.get("APLA_SD15_FOLDER")
    if folder:
        cmd += ["--pretrained", folder]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    targets = report["targets"]
    assert targets["export_peak_rss_over_unet_bytes"] <= 2.0, targets
    assert targets["engine_folder_over_weight_bytes"] <= 1.05, targets
    assert targets["load_over_bare_session"] <= 1.25, targets
    # the real size: SD 1.5's UNet (+ temporal layers) is over 3.4 GB of fp32 weights
    assert report["weight_bytes"]["unet"] > 3.4e9
    # the runtime matches the PyTorch sampler at this size
    assert report["stages"]["rt_vs_torch"]["max_abs_latent_diff"] <= 1e-3
    assert (tmp_path / "work" / "generated.mp4").stat().st_size > 0
