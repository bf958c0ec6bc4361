"""CPU backends side by side: ONNX Runtime fp32 (the runtime's default), OpenVINO fp32, OpenVINO
bf16 (where the CPU has bf16 units), OpenVINO int8 (the networks whose int8 model's recorded
check passed, ``apla-export --int8``) and the PyTorch reference sampler in fp32 and under
``torch.autocast("cpu", torch.bfloat16)``, on one engine folder and its run, in one run.

    python benchmarks/cpu_backends.py --engine-dir ENGINES --run RUN [--threads 2]
        [--repeat 3] [--warmup 1] [--steps N] [--tolerance-seeds 5] [--no-torch] [--json OUT]
        [--networks unet,vgt] [--no-generate]

Prints (and ``--json`` writes): the machine (lscpu's model name and flags, OpenVINO's CPU
capabilities, versions); per network at its profile's opt shape the median call time of each
backend after ``--warmup`` calls and the bf16 error against ONNX Runtime fp32 over
``--tolerance-seeds`` seeds (the calibration of ``apla_rt.backends.precision.BF16_TOLERANCE``);
start-up per backend (ONNX Runtime session creation; OpenVINO compile with an empty cache and
with a warm one); the whole ``generate`` (text, sampling loop, decode; loading excluded) of each
backend from the same start latent with the same seed, and its fidelity against ONNX Runtime
fp32: PSNR of the decoded frames and RMSE of the final latents. ``--steps`` defaults to the
run's sampling steps. The PyTorch figures run in a child process (the runtime's side never
imports torch). The user cache folder is a temporary one (cold and warm starts measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NETWORKS = ("text_encoder", "unet", "vgt", "vae_decoder")


def lscpu() -> dict[str, str]:
    """lscpu's model name and flags."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": "unknown", "flags": ""}
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {"model": info.get("Model name", "").strip(), "flags": info.get("Flags", "").strip()}


def timed(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- runtime side


def runtime_side(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from apla_rt import Pipeline
    from apla_rt.backends import openvino as openvino_runner, precision as cpu_precision
    from apla_rt.backends.compare import compare_outputs, seeded_feeds, worst
    from apla_rt.backends.precision import int8_available
    from apla_rt.folder.manifest import Manifest
    from apla_rt.backends.runners import open_runner
    from apla_rt.media.video import psnr

    manifest = Manifest.open(args.engine_dir)
    why = cpu_precision.bf16_unavailable(cpu_precision.probe_cpu(), openvino_runner.ov_capabilities())
    kinds = [("ort", "fp32"), ("openvino", "fp32")] + ([("openvino", "bf16")] if why is None else [])

    def kinds_for(name: str, usable: bool = False) -> list[tuple[str, str]]:
        """The kinds to run ``name`` in: with its int8 model where the folder has one (its
        single calls are timed whether or not its check passed; ``usable``: only if it did)."""
        has = name in manifest.int8 and (not usable or int8_available(manifest, name)[0])
        return kinds + ([("openvino", "int8")] if has else [])
    ids = openvino_runner.prompt_token_ids(manifest)
    steps_t = manifest.scheduler.num_train_timesteps
    out: dict[str, Any] = {"bf16_unavailable": why, "networks": {}, "generate": {}}
    names = [n for n in args.networks.split(",") if manifest.has(n)]
    for name in names:
        spec = manifest.network(name)
        assert spec.onnx is not None, f"{name} has no portable ONNX file"
        onnx = spec.onnx
        feeds = seeded_feeds(spec, 0, ids if "input_ids" in spec.input_names else None, steps_t)
        row: dict[str, Any] = {"shape": {k: list(v.shape) for k, v in feeds.items()}}
        if name in manifest.int8:
            row["int8_check"] = int8_available(manifest, name)[1]
        seeds = [seeded_feeds(spec, seed, ids if "input_ids" in spec.input_names else None, steps_t)
                 for seed in range(100, 100 + args.tolerance_seeds)]
        outputs: dict[str, list[Any]] = {}
        r: Any
        for backend, precision in kinds_for(name):  # one at a time: SD-size networks are GBs each
            label = f"{backend}-{precision}"
            if backend == "openvino":  # cold: empty model cache; warm: the blob just written
                for state in ("cold", "warm"):
                    start = time.perf_counter()
                    path = manifest.int8[name].model if precision == "int8" else onnx
                    r = openvino_runner.OvRunner(spec, path, precision, args.threads, 1,
                                                 openvino_runner.model_cache_dir(f"{name}-{precision}"))
                    row[f"{label}_start_{state}_s"] = time.perf_counter() - start
                    row[f"{label}_from_cache_{state}"] = r.loaded_from_cache
                    if state == "cold":
                        r.close()
                        del r
            else:
                start = time.perf_counter()
                r = open_runner(manifest, name, "ort", args.threads)
                row[f"{label}_start_s"] = time.perf_counter() - start
            row[f"{label}_call_s"] = timed(lambda: r.run(feeds), args.warmup, args.repeat)
            if label in ("ort-fp32", "openvino-bf16", "openvino-int8"):
                outputs[label] = [r.run(f) for f in seeds]
            r.close()
            del r
        for reduced in ("bf16", "int8"):
            if f"openvino-{reduced}" in outputs:
                pairs = zip(outputs["ort-fp32"], outputs[f"openvino-{reduced}"])
                errors = [compare_outputs(ref, got) for ref, got in pairs]
                row[f"{reduced}_error"] = worst(errors, ("max_abs", "rel_rms"))
        out["networks"][name] = row
        log(f"{name:<13} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items() if k != "shape"))
    if args.no_generate:
        return out
    start_latent = np.load(args.start)
    ref_frames: Any = None
    ref_latents: Any = None
    for backend, precision in kinds_for("unet", usable=True):
        label = f"{backend}-{precision}"
        started = time.perf_counter()
        with Pipeline.open(args.engine_dir, "ort-cpu" if backend == "ort" else backend, args.threads,
                           precision=precision) as pipe:
            open_s = time.perf_counter() - started
            steps = args.steps or pipe.settings_for().steps
            pipe.generate(args.prompt, latent=start_latent, steps=1)  # warm-up

            def sample() -> Any:
                return pipe.generate(args.prompt, latent=start_latent, steps=steps)[0]

            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                video = sample()
                times.append(time.perf_counter() - t0)
            row = {"open_s": open_s, "generate_s": statistics.median(times), "steps": steps,
                   "precision": pipe.describe_precision(), "backend": pipe.describe(),
                   "notes": list(pipe.placement.notes)}
        if ref_frames is None:
            ref_frames, ref_latents = video.frames, video.latents
        else:
            row["psnr_db_vs_ort_fp32"] = psnr(ref_frames, video.frames)
            row["latent_rmse_vs_ort_fp32"] = float(np.sqrt(np.mean((video.latents - ref_latents) ** 2)))
            row["latent_rms"] = float(np.sqrt(np.mean(ref_latents ** 2)))
        np.save(Path(args.workdir) / f"frames-{label}.npy", video.frames)
        out["generate"][label] = row
        log(f"generate {label:<14} " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return out


# --------------------------------------------------------------------------- PyTorch side


def torch_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from apla_rt.media.video import psnr
    from apla_train import checkpoint as ckpt
    from apla_train.components import encode_prompts
    from apla_train.config import from_dict
    from apla_train.sampling import ddim_sample, decode_video
    from apla_train.train import apply_checkpoint, build_models

    run = Path(args.run)
    cfg = from_dict(json.loads((run / "config.json").read_text())).validate()
    components, vgt = build_models(cfg, run)
    last = ckpt.latest_checkpoint(run)
    assert last is not None, f"{run} has no checkpoint"
    apply_checkpoint(components, vgt, last, cfg.model.trainable)
    components.unet.eval()
    if vgt is not None:
        vgt.eval()
    start = torch.from_numpy(np.load(args.start))
    ref = np.load(Path(args.workdir) / "frames-ort-fp32.npy")
    rng = np.random.default_rng(0)
    b = 2
    sample = torch.from_numpy(rng.standard_normal((b, *start.shape[1:])).astype(np.float32))
    out: dict[str, Any] = {}
    for label, autocast in (("torch-fp32", False), ("torch-bf16-autocast", True)):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            text = torch.cat([encode_prompts(components, [""]), encode_prompts(components, [args.prompt])])
            t = torch.full((b,), 500, dtype=torch.long)
            row: dict[str, Any] = {
                "text_encoder_call_s": timed(lambda: encode_prompts(components, ["", args.prompt]),
                                             args.warmup, args.repeat),
                "unet_call_s": timed(lambda: components.unet(sample, t, text.float()), args.warmup, args.repeat),
                "vae_decoder_call_s": timed(lambda: components.codec.decode(sample[0].permute(1, 0, 2, 3)),
                                            args.warmup, args.repeat)}
            if vgt is not None:
                row["vgt_call_s"] = timed(lambda: vgt(sample[:1], t[:1]), args.warmup, args.repeat)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                text = torch.cat([encode_prompts(components, [""]),
                                  encode_prompts(components, [args.prompt])]).float()
                z = ddim_sample(components.unet, vgt, start, text, components.scheduler, args.steps_resolved,
                                args.guidance, start_timestep=args.start_timestep)
                frames = decode_video(components.codec, z.float())
                times.append(time.perf_counter() - t0)
            row["generate_s"] = statistics.median(times)
            row["psnr_db_vs_ort_fp32"] = psnr(ref, frames)
        out[label] = row
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", required=True)
    parser.add_argument("--run", help="the run folder (for the PyTorch reference sampler)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--tolerance-seeds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-generate", action="store_true", help="single calls only")
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help="the networks whose single calls are timed (comma-separated)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    parser.add_argument("--guidance", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--steps-resolved", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-timestep", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_worker(args)))
        return 0

    import onnxruntime
    import openvino

    from apla_rt import Pipeline
    from apla_rt.backends import openvino as openvino_runner
    from apla_rt.folder.latents import folder_start_timestep
    from apla_rt.backends.precision import CACHE_ENV

    machine = {**lscpu(), "openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__,
               "openvino_cpu_capabilities": list(openvino_runner.ov_capabilities()),
               "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    print(f"machine: {machine['model']}; OpenVINO {machine['openvino']} capabilities "
          f"{machine['openvino_cpu_capabilities']}; ONNX Runtime {machine['onnxruntime']}; "
          f"{args.threads} threads\nflags: {machine['flags']}")
    with tempfile.TemporaryDirectory(prefix="apla-cpu-backends-") as tmp:
        with Pipeline.open(args.engine_dir, "ort-cpu", args.threads, precision="fp32") as pipe:
            start = pipe.generate("x", steps=1)[0].start  # the folder's start latent
            args.prompt = pipe.manifest.prompt or "a video"
            args.guidance = pipe.settings_for().guidance
            args.steps_resolved = args.steps or pipe.settings_for().steps
            args.start_timestep = folder_start_timestep(pipe.manifest)  # the torch side's grid starts there too
        args.start = str(Path(tmp) / "start.npy")
        args.workdir = tmp
        np.save(args.start, start)
        old = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(Path(tmp) / "cache")  # cold starts: an empty model cache
        try:
            result: dict[str, Any] = {"machine": machine, **runtime_side(args, print)}
        finally:
            if old is None:
                os.environ.pop(CACHE_ENV)
            else:
                os.environ[CACHE_ENV] = old
        if not args.no_torch and args.run:
            cmd = [sys.executable, __file__, "--torch-worker", "--engine-dir", args.engine_dir,
                   "--run", args.run, "--threads", str(args.threads), "--repeat", str(args.repeat),
                   "--warmup", str(args.warmup), "--start", args.start, "--workdir", tmp,
                   "--prompt", args.prompt, "--guidance", str(args.guidance),
                   "--steps-resolved", str(args.steps_resolved),
                   "--start-timestep", str(args.start_timestep)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            result["torch"] = json.loads(done.stdout.strip().splitlines()[-1])
            for label, row in result["torch"].items():
                print(f"{label:<20} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
