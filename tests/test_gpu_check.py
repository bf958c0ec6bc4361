"""benchmarks/gpu_check.py on this machine: the CPU chain runs for real, and every stage that
needs what the machine lacks (a CUDA GPU, onnxruntime-gpu, TensorRT) is reported as skipped
with the reason from the same checks the runtime uses, never as done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_reports_what_ran_and_skips_the_rest(tmp_path, capsys):
    import torch

    from apla_rt.backends.gpu import trt_available
    from apla_rt.backends.gpu import ort_cuda_status

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    out = tmp_path / "check"
    code = gpu_check.main(["--out", str(out), "--steps", "2", "--sample-steps", "2", "--threads", "2"])
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert code == 0, printed
    tiny = report["models"]["tiny"]["stages"]
    cuda = torch.cuda.is_available()
    train = tiny["train (cuda, fp16 autocast)" if cuda else "train (cpu, fp32)"]
    assert train["status"] == "ok" and train["seconds"] > 0
    assert tiny["export --fp16"]["status"] == "ok"
    assert tiny["export --fp16"]["fp16_onnx"]["unet"]["passed"] is True
    ref = tiny["generate ort-cpu fp32"]
    assert ref["status"] == "ok" and ref["backend"].startswith("onnxruntime-cpu") and ref["stages"]["unet"] > 0
    ort_ok, ort_why = ort_cuda_status()
    if not ort_ok:
        assert tiny["generate ort-cuda fp16"] == {"status": "skipped", "reason": ort_why}
    trt_ok, trt_why = trt_available()
    if not trt_ok:
        assert tiny["generate trt"] == {"status": "skipped", "reason": trt_why}
    if not cuda:
        sd = report["models"]["sd15-shaped"]["stages"]
        assert sd and all(s["status"] == "skipped" and "no CUDA GPU" in s["reason"] for s in sd.values())
        assert "torch_peak_mib" not in train  # no GPU figure without a GPU
        assert report["machine"]["torch_cuda"] is False
    for stage in ("generate ort-cuda fp16", "generate trt"):
        if tiny[stage]["status"] == "skipped":
            assert f"[tiny] {stage}: skipped: {tiny[stage]['reason']}" in printed
