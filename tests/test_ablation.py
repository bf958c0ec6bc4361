"""benchmarks/ablation.py --quick end to end: the table, results.json and valid PNGs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    if not (SHARED_DATA / "man-skiing.mp4").is_file():
        pytest.skip(f"{SHARED_DATA / 'man-skiing.mp4'} is not available")
    tmp = tmp_path_factory.mktemp("ablation")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp / "docs"),
                           "--runs", str(tmp / "runs")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_markdown_table_and_caveats(quick):
    text = (quick / "docs" / "ablation.md").read_text()
    assert "| method | rec FC all | rec FC cons |" in text
    for row in ("| source clip |", "| `none` |", "| `hyper` |"):
        assert row in text
    assert "NOT CLIP" in text and "randomly initialised" in text
    assert "python benchmarks/ablation.py --quick" in text


@pytest.mark.slow
def test_results_json(quick):
    data = json.loads((quick / "docs" / "ablation" / "results.json").read_text())
    assert {"command", "date", "machine", "settings", "embedder", "summary", "source", "runs"} <= set(data)
    assert data["settings"]["steps"] == 3 and data["settings"]["sample_steps"] == 2
    assert set(data["summary"]) == {"none", "hyper"}
    for entry in data["summary"].values():
        for kind in ("reconstruction", "text_to_video"):
            assert {"fc_all", "fc_consecutive", "warp_error", "psnr", "ssim", "static"} <= set(entry[kind])
        assert entry["reconstruction"]["psnr"] > 0
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        assert [v["kind"] for v in run["videos"]] == ["reconstruction", "edit"]
        for v in run["videos"]:
            assert len(v["ratio"]) == len(v["timesteps"]) == 2
            if run["method"] == "none":
                assert all(r == 0 for r in v["ratio"])
            else:
                assert all(r >= 0 for r in v["ratio"])
        assert Path(run["run"]).is_relative_to(quick / "runs")


@pytest.mark.slow
def test_pngs_are_valid(quick):
    folder = quick / "docs" / "ablation"
    for name in ("metrics.png", "ratio.png", "frames-man-skiing.png"):
        with Image.open(folder / name) as im:
            assert im.format == "PNG"
            im.verify()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
