"""One command for the day a GPU is there: train -> export --fp16 -> generate on every backend
this machine has, compared with the CPU/FP32 runtime, into one JSON report.

    python benchmarks/gpu_check.py [--out DIR] [--json FILE] [--sd-folder PATH | --no-sd]

For the tiny model and for the SD-1.5-shaped random model (``--sd-folder``, else written with
``benchmarks/make_sd_shaped.py`` into ``--out``) it

1. trains a few steps (``--steps``, 4 frames of the example clip; FP16 autocast on CUDA, the
   perceptual term off: no LPIPS weights offline) at 64 px (tiny) / 256 px (SD-shaped),
   recording the time and ``torch.cuda.max_memory_allocated``;
2. exports with ``--fp16`` (ONNX, the FP16 UNet and its check; TensorRT engines where
   TensorRT is usable);
3. generates the same video (start latent, ``--sample-steps`` DDIM steps) with ONNX Runtime
   on the CPU (FP32: the reference), with ONNX Runtime's CUDA provider (the FP16 UNet) and
   with TensorRT, and reports each one's stage times and its largest difference from the
   reference (uint8 frames, and the final latents).

Stages that need what this machine lacks are reported as ``skipped`` with the reason (no CUDA
GPU, no onnxruntime-gpu, no TensorRT), never faked. On a CPU-only machine the tiny model still
runs the whole CPU chain (trained in FP32 on the CPU), the SD-shaped model's training at 256 px
is GPU-only and is skipped with what depends on it. The report also records the machine, the
packages and, per stage, the CUDA memory in use on the device after it (``cudaMemGetInfo``:
it counts ONNX Runtime's and TensorRT's allocations too, which ``max_memory_allocated`` does not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a man is skiing"
MODELS = {  # name -> (image size, frames)
    "tiny": (64, 4),
    "sd15-shaped": (256, 4),
}


def find_clip() -> Path:
    for path in (ROOT.parent / "shared" / "data" / "man-skiing.mp4", ROOT / "examples" / "man-skiing.mp4"):
        if path.is_file():
            return path
    raise SystemExit("gpu_check: no example clip (examples/man-skiing.mp4) in this checkout")


class Report:
    """The JSON report and one printed line per stage."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "machine": machine(), "models": {}}

    def model(self, name: str) -> dict[str, Any]:
        return self.data["models"].setdefault(name, {"stages": {}, "differences": {}})

    def skip(self, model: str, stage: str, reason: str) -> None:
        self.model(model)["stages"][stage] = {"status": "skipped", "reason": reason}
        print(f"[{model}] {stage}: skipped: {reason}", flush=True)

    def run(self, model: str, stage: str, func: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        cuda = _torch_cuda()
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            extra = func() or {}
            entry: dict[str, Any] = {"status": "ok", **extra}
        except Exception as err:  # noqa: BLE001 - a failed stage is reported, the check goes on
            entry = {"status": "failed", "error": f"{type(err).__name__}: {' '.join(str(err).split())[:400]}",
                     "traceback": traceback.format_exc(limit=6)}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        if cuda:
            import torch

            entry["torch_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            free, total = torch.cuda.mem_get_info()
            entry["device_used_mib_after"] = round((total - free) / 2**20, 1)
        self.model(model)["stages"][stage] = entry
        detail = entry.get("error") or ", ".join(f"{k} {v}" for k, v in entry.items()
                                                 if k in ("torch_peak_mib", "backend", "max_abs_frames"))
        print(f"[{model}] {stage}: {entry['status']} in {entry['seconds']} s" + (f" ({detail})" if detail else ""),
              flush=True)
        self.save()
        return entry if entry["status"] == "ok" else None

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(self.path.suffix + ".partial")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            tmp.replace(self.path)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from apla_rt.backends.gpu import trt_available
    from apla_rt.backends.gpu import ort_cuda_status

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "diffusers", "polygraphy"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    cuda = _torch_cuda()
    info["torch_cuda"] = cuda
    if cuda:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["ort_cuda"], info["ort_cuda_reason"] = ort_cuda_status()
    info["tensorrt_usable"], info["tensorrt_reason"] = trt_available()
    try:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["ort_providers"] = []
    return info


def sd_folder(args: argparse.Namespace, out: Path) -> tuple[Path | None, str]:
    if args.sd_folder:
        return Path(args.sd_folder), ""
    script = ROOT / "benchmarks" / "make_sd_shaped.py"
    if not script.is_file():
        return None, "benchmarks/make_sd_shaped.py is missing and no --sd-folder was given"
    folder = out / "sd15"
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, str(script), str(folder), "--force"], check=True)
    return folder, ""


def train_run(model: str, run: Path, clip: Path, steps: int, sd: Path | None) -> dict[str, Any]:
    from apla_train.cli import build_config
    from apla_train.train import train

    size, frames = MODELS[model]
    overrides = ("loss.l_per=0", "sample.steps=2", "sample.inversion_steps=2",
                 f"train.checkpoint_every={steps}")
    cfg = build_config(str(clip), PROMPT, "tiny" if model == "tiny" else None,
                       str(sd) if model != "tiny" else None, None, overrides,
                       {"train.steps": steps, "data.n_frames": frames, "data.size": size})
    summary = train(cfg, run, force=True, log=lambda m: None, progress=False)
    return {"mixed_precision": "fp16" if _torch_cuda() else "no (CPU: fp32)",
            "loss_first": summary.get("loss_first10"), "loss_last": summary.get("loss_last10")}


def export(run: Path, engines: Path, backend: str) -> dict[str, Any]:
    from export.pipeline import export_run

    lines: list[str] = []
    manifest = export_run(run, engines, fp16=True, backend=backend, force=True, log=lines.append)
    nets = manifest["networks"]
    return {"log": lines,
            "fp16_onnx": {n: e.get("fp16_check") for n, e in nets.items() if "fp16_check" in e},
            "engines": {n: e.get("trt_status", "not built") for n, e in nets.items()}}


def generate(engines: Path, backend: str, steps: int, threads: int | None, keep: dict) -> dict[str, Any]:
    import numpy as np

    from apla_rt import Pipeline

    with Pipeline.open(engines, backend, threads) as pipe:
        result, = pipe.generate(PROMPT, steps=steps)
        out: dict[str, Any] = {"backend": f"{pipe.describe()}, precision {pipe.describe_precision()}",
                               "stages": pipe.timings.as_dict()}
    if "reference" not in keep:
        keep["reference"] = result
    else:
        ref = keep["reference"]
        out["max_abs_frames"] = int(np.abs(result.frames.astype(np.int16) - ref.frames.astype(np.int16)).max())
        out["mean_abs_frames"] = float(np.abs(result.frames.astype(np.float32) - ref.frames).mean())
        out["max_abs_latents"] = float(np.abs(result.latents - ref.latents).max())
    return out


def check_model(report: Report, model: str, out: Path, clip: Path, args: argparse.Namespace) -> None:
    from apla_rt.backends.gpu import trt_available
    from apla_rt.backends.gpu import ort_cuda_status

    cuda = _torch_cuda()
    entry = report.model(model)
    entry["size"], entry["frames"] = MODELS[model]
    sd = None
    if model != "tiny":
        if not cuda:
            for stage in ("train", "export", "generate ort-cpu fp32", "generate ort-cuda fp16", "generate trt"):
                report.skip(model, stage, "no CUDA GPU (torch.cuda.is_available() is False): training "
                            "the SD-shaped model at 256 px is GPU-only here, and what follows needs that run")
            return
        sd, why = sd_folder(args, out)
        if sd is None:
            report.skip(model, "train", why)
            return
    run, engines = out / f"{model}-run", out / f"{model}-engines"
    if report.run(model, "train" + (" (cuda, fp16 autocast)" if cuda else " (cpu, fp32)"),
                  lambda: train_run(model, run, clip, args.steps, sd)) is None:
        return
    trt_ok, trt_why = trt_available()
    backend = "auto" if trt_ok else "onnx"
    if report.run(model, "export --fp16", lambda: export(run, engines, backend)) is None:
        return
    keep: dict = {}
    if report.run(model, "generate ort-cpu fp32",
                  lambda: generate(engines, "ort-cpu", args.sample_steps, args.threads, keep)) is None:
        return
    ort_ok, ort_why = ort_cuda_status()
    if ort_ok:
        res = report.run(model, "generate ort-cuda fp16",
                         lambda: generate(engines, "ort-cuda", args.sample_steps, None, keep))
        if res:
            entry["differences"]["ort-cuda vs ort-cpu"] = {k: res[k] for k in res if k.startswith(("max_", "mean_"))}
    else:
        report.skip(model, "generate ort-cuda fp16", ort_why)
    if not trt_ok:
        report.skip(model, "generate trt", trt_why)
        return
    stages = entry["stages"]["export --fp16"]["engines"]
    if not any(s == "ok" for s in stages.values()):
        report.skip(model, "generate trt", f"no engine passed its check ({stages})")
        return
    res = report.run(model, "generate trt", lambda: generate(engines, "trt", args.sample_steps, None, keep))
    if res:
        entry["differences"]["trt vs ort-cpu"] = {k: res[k] for k in res if k.startswith(("max_", "mean_"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="work folder (runs, engines)")
    parser.add_argument("--json", type=Path, help="report file (default OUT/report.json)")
    parser.add_argument("--sd-folder", help="an SD-1.5-shaped (or real SD 1.x) diffusers folder")
    parser.add_argument("--no-sd", action="store_true", help="only the tiny model")
    parser.add_argument("--steps", type=int, default=3, help="training steps per model")
    parser.add_argument("--sample-steps", type=int, default=4, help="DDIM steps per generation")
    parser.add_argument("--threads", type=int, help="CPU threads for the CPU reference")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.json or args.out / "report.json")
    info = report.data["machine"]
    print("gpu_check: " + ", ".join(f"{k} {info[k]}" for k in ("torch", "torch_cuda", "onnxruntime",
                                                                 "onnxruntime-gpu", "tensorrt")), flush=True)
    clip = find_clip()
    models = ["tiny"] + ([] if args.no_sd else ["sd15-shaped"])
    for model in models:
        check_model(report, model, args.out, clip, args)
    report.save()
    failed = [f"{m}: {s}" for m, e in report.data["models"].items() for s, v in e["stages"].items()
              if v["status"] == "failed"]
    print(f"gpu_check: report written to {report.path}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
