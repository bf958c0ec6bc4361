"""benchmarks/ablation.py --quick end to end on man-skiing (``shared/data``'s, else the
repository's example): the table, results.json, the recorded ||delta|| / ||eps_theta||
against the networks, and valid PNGs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"


@pytest.fixture(scope="module")
def quick(skiing, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ablation")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp / "docs"),
                           "--runs", str(tmp / "runs"), "--clips", str(skiing.parent)],
                          capture_output=True, text=True, timeout=300)
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
def test_recorded_ratio_is_the_networks(quick):
    """Each hyper video's first recorded ratio, recomputed from the run's checkpoint with the
    UNet and the VGT called directly on its start latent (guided as the sampler does)."""
    import torch

    from apla_train.components import encode_prompts
    from export.pipeline import load_run

    data = json.loads((quick / "docs" / "ablation" / "results.json").read_text())
    run = next(r for r in data["runs"] if r["method"] == "hyper")
    cfg, comp, vgt, _ = load_run(Path(run["run"]))
    assert vgt is not None and not cfg.vgt.source
    z = torch.from_numpy(np.load(Path(run["run"]) / "start_latent.npy"))
    g = data["guidance"]
    with torch.no_grad():
        uncond = encode_prompts(comp, [""])
        for video in run["videos"]:
            t = video["timesteps"][0]
            text = torch.cat([uncond, encode_prompts(comp, [video["prompt"]])])
            eps = comp.unet(torch.cat([z, z]), torch.tensor([t, t]), text)
            eps_theta = eps[:1] + g * (eps[1:] - eps[:1])
            delta = vgt(z, torch.tensor([t]))
            want = float(delta.norm() / eps_theta.norm())
            assert want > 0  # trained: the VGT's last layer moved off zero
            # float32, the benchmark on 1 thread and this test on 2: measured 1e-7 apart
            assert video["ratio"][0] == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_pngs_are_valid(quick):
    folder = quick / "docs" / "ablation"
    for name in ("metrics.png", "ratio.png", "frames-man-skiing.png"):
        with Image.open(folder / name) as im:
            assert im.format == "PNG"
            im.verify()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
