"""PyTorch reference sampler vs the NumPy/ONNX Runtime runtime on the same run.

    python benchmarks/rt_vs_torch.py --run runs/ski --engine-dir engines/ski [--frames F]
        [--steps N] [--guidance G] [--seed S] [--threads 2] [--repeat R] [--json]

Both samplers start from the same latent (the engine folder's inverted start latent, or
seeded Gaussian noise when ``--frames`` differs from its frame count), with the same prompt,
steps and guidance, and each runs in its own subprocess so that each one's peak RSS is its
own (``getrusage(RUSAGE_SELF)`` in the child). torch threads = the runtime's ``--threads``
(with 2 or more its UNet runs the two guidance halves side by side, ``--threads`` threads in
all). Timed: text encoding + the sampling loop + decoding (``*_s``); model loading is reported
separately (``*_load_s``). The runtime child never imports torch.

``--repeat R`` runs the pair R times (torch first in odd pairs, the runtime first in even
ones) and reports the median of each figure, per-stage times included, ``speedup`` as the
median of the pairs' ratios, and every pair's sample times under ``runs``: on a shared
machine one pair can be 20-30 % off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------- workers


def worker_torch(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample, decode_video
    from export.pipeline import load_run

    started = time.perf_counter()
    _, components, vgt, _ = load_run(Path(args.run))  # the run's networks, as apla-export rebuilds them
    load_s = time.perf_counter() - started

    start = torch.from_numpy(np.load(args.start))
    started = time.perf_counter()
    with torch.no_grad():
        text = torch.cat([encode_prompts(components, [args.negative_prompt]),
                          encode_prompts(components, [args.prompt])])
        start_t = json.loads(Path(args.start).with_suffix(".json").read_text())["timestep"]
        z = ddim_sample(components.unet, vgt, start, text, components.scheduler, args.steps,
                        args.guidance, start_timestep=start_t)
        frames = decode_video(components.codec, z)
    sample_s = time.perf_counter() - started
    np.save(args.latents, z.numpy())
    np.save(args.frames_out, frames)
    return {"load_s": load_s, "sample_s": sample_s, "peak_rss_mib": _peak_rss_mib()}


def worker_rt(args: argparse.Namespace) -> dict:
    for name in ("torch", "apla_train", "export"):
        sys.modules[name] = None  # type: ignore[assignment]  # prove the runtime needs none
    from apla_rt import Pipeline

    with Pipeline.open(args.engine_dir, "ort", args.threads, precision="fp32") as pipe:
        video, = pipe.generate(args.prompt, latent=args.start, steps=args.steps,
                               guidance=args.guidance, negative_prompt=args.negative_prompt)
        timings = pipe.timings
        backend = f"{pipe.describe()}, precision {pipe.describe_precision()}"
    np.save(args.latents, video.latents)
    np.save(args.frames_out, video.frames)
    load_s = timings.seconds["load"]
    # the warm-up calls made when the pipeline opens count as sampling: the PyTorch side's
    # first calls are inside its sampling too
    return {"load_s": load_s, "sample_s": timings.total - load_s,
            "peak_rss_mib": _peak_rss_mib(), "stages": timings.as_dict(), "backend": backend}


# --------------------------------------------------------------------------- parent


def _median(results: list[dict]) -> dict:
    """Per-key median of the children's numeric figures (one level of nested dicts too, the
    runtime's stages); other values from the first."""
    merged = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = float(np.median([r[key] for r in results]))
        elif isinstance(value, dict):
            merged[key] = _median([r[key] for r in results])
    return merged


def _pair(args: argparse.Namespace, tmp: Path, start: Path, torch_first: bool) -> tuple[dict, dict]:
    if torch_first:
        torch_r = _child("torch", args, tmp, start)
        return torch_r, _child("rt", args, tmp, start)
    rt_r = _child("rt", args, tmp, start)
    return _child("torch", args, tmp, start), rt_r


def _child(kind: str, args: argparse.Namespace, tmp: Path, start: Path) -> dict:
    out = tmp / f"{kind}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--run", str(args.run),
           "--engine-dir", str(args.engine_dir), "--steps", str(args.steps),
           "--guidance", repr(args.guidance), "--threads", str(args.threads),
           "--prompt", args.prompt, "--negative-prompt", args.negative_prompt,
           "--start", str(start), "--latents", str(tmp / f"{kind}.npy"),
           "--frames-out", str(tmp / f"{kind}-frames.npy"), "--result", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="training run folder")
    p.add_argument("--engine-dir", required=True, type=Path, help="its exported engine folder")
    p.add_argument("--frames", type=int, help="frames (default: the start latent's)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed when --frames differs")
    p.add_argument("--prompt", default=None, help="prompt (default: the training prompt)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--threads", type=int, default=2, help="torch threads = the runtime's --threads")
    p.add_argument("--repeat", type=int, default=1, help="run the pair R times; report medians")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # worker mode (internal)
    p.add_argument("--worker", choices=["torch", "rt"], help=argparse.SUPPRESS)
    for hidden in ("--start", "--latents", "--frames-out", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    if args.worker:
        result = (worker_torch if args.worker == "torch" else worker_rt)(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from apla_rt.folder.latents import StartLatents, timestep_path_for
    from apla_rt.folder.manifest import Manifest
    from apla_rt.media.video import psnr as video_psnr  # torch-free, like this parent must stay

    manifest = Manifest.open(args.engine_dir)
    defaults = manifest.sampling_defaults()
    if args.steps is None:
        args.steps = defaults.steps or 50
    if args.guidance is None:
        args.guidance = defaults.guidance if defaults.guidance is not None else 12.5
    args.prompt = args.prompt if args.prompt is not None else manifest.prompt
    with tempfile.TemporaryDirectory(prefix="rt-vs-torch-") as name:
        tmp = Path(name)
        start_path = tmp / "start.npy"
        shape = manifest.start_latent_shape()
        from_noise = shape is None or args.frames not in (None, shape[2])
        start = StartLatents(manifest, False).resolve(args.frames, args.seed, from_noise, None)
        origin = f"Gaussian noise (seed {args.seed})" if from_noise else "the engine folder's start latent"
        np.save(start_path, start.start)
        timestep_path_for(start_path).write_text(json.dumps({"timestep": start.timestep}))
        pairs = [_pair(args, tmp, start_path, torch_first=i % 2 == 0) for i in range(args.repeat)]
        torch_r, rt_r = _median([p[0] for p in pairs]), _median([p[1] for p in pairs])
        diff = float(np.abs(np.load(tmp / "torch.npy") - np.load(tmp / "rt.npy")).max())
        psnr = video_psnr(np.load(tmp / "torch-frames.npy"), np.load(tmp / "rt-frames.npy"))

    report = {
        "torch_s": round(torch_r["sample_s"], 3), "rt_s": round(rt_r["sample_s"], 3),
        "speedup": round(float(np.median([t["sample_s"] / r["sample_s"] for t, r in pairs])), 2),
        "max_abs_latent_diff": diff, "frames_psnr_db": round(psnr, 2) if math.isfinite(psnr) else None,
        "torch_load_s": round(torch_r["load_s"], 3), "rt_load_s": round(rt_r["load_s"], 3),
        "torch_peak_rss_mib": round(torch_r["peak_rss_mib"], 1),
        "rt_peak_rss_mib": round(rt_r["peak_rss_mib"], 1),
        "torch_process_s": round(torch_r["process_wall_s"], 2),
        "rt_process_s": round(rt_r["process_wall_s"], 2),
        "process_speedup": round(float(np.median([t["process_wall_s"] / r["process_wall_s"]
                                                  for t, r in pairs])), 2),
        "rt_stages_s": rt_r["stages"], "rt_backend": rt_r["backend"],
        "frames": int(start.start.shape[2]), "latent": list(start.start.shape), "start": origin,
        "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
        "prompt": args.prompt, "repeat": args.repeat,
        "runs": [{"torch_s": round(t["sample_s"], 3), "rt_s": round(r["sample_s"], 3)}
                 for t, r in pairs],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.steps} DDIM steps, guidance {args.guidance:g}, latent {list(start.shape)} from "
          f"{origin}, {args.threads} threads each"
          + (f", median of {args.repeat} runs" if args.repeat > 1 else ""))
    print(f"{'':24} {'torch':>10} {'apla-rt':>10}")
    print(f"{'sample (text+loop+VAE) s':24} {report['torch_s']:>10.3f} {report['rt_s']:>10.3f}")
    print(f"{'load s':24} {report['torch_load_s']:>10.3f} {report['rt_load_s']:>10.3f}")
    print(f"{'process wall s':24} {report['torch_process_s']:>10.2f} {report['rt_process_s']:>10.2f}"
          f"   ({report['process_speedup']:.2f}x)")
    print(f"{'peak RSS MiB':24} {report['torch_peak_rss_mib']:>10.1f} {report['rt_peak_rss_mib']:>10.1f}")
    print(f"speedup (sample): {report['speedup']:.2f}x; max |latent diff| {diff:.3g}; "
          f"frames PSNR {psnr:.2f} dB")
    if args.repeat > 1:
        print("each run's sample s (torch / apla-rt): "
              + ", ".join(f"{r['torch_s']:.2f} / {r['rt_s']:.2f}" for r in report["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
