"""Train -> export -> generate at Stable Diffusion 1.5's size, one process per stage.

    python benchmarks/sd_scale.py [--pretrained DIR] [--work DIR] [--video CLIP]
        [--frames 4] [--size 128] [--train-steps 3] [--steps 4] [--threads 2]
        [--set KEY=VALUE ...] [--compare-steps 2] [--run RUN] [--json OUT.json]

Without ``--pretrained`` an SD-1.5-shaped random folder is written first
(``benchmarks/make_sd_shaped.py``). Each stage runs in its own child process and its peak RSS
is that child's own ``ru_maxrss`` (``os.wait4``); this parent imports neither torch nor
onnxruntime, so that a forked child's peak does not start from a large parent image.

Stages: ``apla-train`` (a few steps at low resolution; ``--set`` overrides are passed on, the
defaults keep the post-training sampling short; ``--run`` reuses a trained run instead),
``apla-export`` with its defaults,
``apla-rt generate`` on the real clip's start latent with ``--timings``, and, side by side with
it, a bare ONNX Runtime session creation over the same files with the same session options
(the reference for the runtime's ``load`` stage; measured before and after the runtime, the
faster of the two is the reference). ``--compare-steps N`` also runs
``benchmarks/rt_vs_torch.py`` for N steps (latents of the runtime vs the PyTorch sampler).

The JSON holds per stage wall time and peak RSS, the folder sizes, the networks' weight bytes
(the initializer bytes of each portable ONNX graph), the runtime's stage timings and the three
ratios the export and runtime are held to: export peak RSS / fp32 UNet bytes, engine folder /
weight bytes, load / bare session creation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT.parent / "shared" / "data" / "man-skiing.mp4"
FALLBACK_CLIP = ROOT / "examples" / "man-skiing.mp4"
GIB = 1024 ** 3
# short post-training sampling: the figures are about model size, not about sampling length
TRAIN_SETS = ("loss.l_per=0", "sample.steps=3", "sample.inversion_steps=3")


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_child(name: str, cmd: list[str], threads: int, log: Path) -> dict:
    """Run ``cmd``; its wall time and its own peak RSS (``ru_maxrss`` of exactly this child)."""
    print(f"[sd_scale] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=_env(threads), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"[sd_scale] {name} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    result = {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3)}
    print(f"[sd_scale] {name}: {result}", file=sys.stderr, flush=True)
    return result


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- workers


def _open_files(engine_dir: Path, networks: tuple[str, ...]) -> list[Path]:
    """The ONNX file the runtime's CPU runner opens for each network."""
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    files = []
    for name in networks:
        entry = manifest["networks"].get(name)
        if entry is not None:
            files.append(engine_dir / (entry.get("onnx_ort") or entry["onnx"]))
    return files


def worker_bare(args: argparse.Namespace) -> dict:
    """Bare session creation over the runtime's files, with the runtime's session options."""
    import onnxruntime as ort

    started = time.perf_counter()
    sessions = []
    per_file = {}
    for path in _open_files(Path(args.engine_dir), ("text_encoder", "unet", "vgt", "vae_decoder")):
        t0 = time.perf_counter()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        per_file[path.name] = round(time.perf_counter() - t0, 3)
    return {"session_s": round(time.perf_counter() - started, 3), "per_file_s": per_file}


def worker_generate(args: argparse.Namespace) -> dict:
    for name in ("torch", "apla_train", "export"):
        sys.modules[name] = None  # type: ignore[assignment]  # the runtime needs none of them
    from apla_rt import Pipeline

    with Pipeline.open(args.engine_dir, "ort", args.threads) as pipe:
        video, = pipe.generate(args.prompt, steps=args.steps)
        with pipe.timings("video write"):
            video.save(args.out_video, force=True)
        return {"timings_s": {k: round(v, 3) for k, v in pipe.timings.as_dict().items()},
                "total_s": round(pipe.timings.total, 3),
                "backend": f"{pipe.describe()}, precision {pipe.describe_precision()}"}


def onnx_weight_bytes(path: Path) -> int:
    """Initializer bytes of an ONNX file (external data by its recorded lengths; nothing loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += onnx.numpy_helper.to_array(t).nbytes
    return total


def worker_weights(args: argparse.Namespace) -> dict:
    """Initializer bytes of each network's portable graph (read without its weights)."""
    manifest = json.loads((Path(args.engine_dir) / "manifest.json").read_text())
    return {name: onnx_weight_bytes(Path(args.engine_dir) / entry["onnx"])
            for name, entry in manifest["networks"].items()}


WORKERS = {"bare": worker_bare, "generate": worker_generate, "weights": worker_weights}


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", type=Path, help="SD 1.x diffusers folder (default: write an "
                   "SD-1.5-shaped random one into --work)")
    p.add_argument("--run", type=Path, help="reuse this trained run (skips the train stage)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "sd_scale", help="working folder")
    p.add_argument("--video", type=Path, help="training clip (default: shared/data/man-skiing.mp4)")
    p.add_argument("--prompt", default="a man is skiing")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="generate's DDIM steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"extra apla-train overrides (always: {', '.join(TRAIN_SETS)})")
    p.add_argument("--compare-steps", type=int, default=2, help="rt_vs_torch steps (0: skip)")
    p.add_argument("--json", type=Path, help="write the report here (default: WORK/sd_scale.json)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--engine-dir", help=argparse.SUPPRESS)
    p.add_argument("--out-video", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](args)))
        return 0

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    video = args.video or (DEFAULT_CLIP if DEFAULT_CLIP.is_file() else FALLBACK_CLIP)
    py = sys.executable
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "processor": platform.processor() or platform.machine()},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "settings": {"frames": args.frames, "size": args.size, "train_steps": args.train_steps,
                                 "generate_steps": args.steps, "threads": args.threads,
                                 "train_sets": list(TRAIN_SETS) + args.sets, "video": video.name},
                    "stages": {}}
    try:
        report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                          capture_output=True).stdout.strip() or None
    except OSError:
        report["commit"] = None
    stages = report["stages"]
    pretrained = args.pretrained
    if pretrained is None:
        pretrained = work / "sd15"
        if not (pretrained / "unet").is_dir():
            stages["make"] = run_child("make", [py, str(ROOT / "benchmarks" / "make_sd_shaped.py"),
                                                str(pretrained), "--force"], args.threads, work / "make.log")
    run, engine = (args.run.resolve() if args.run else work / "run"), work / "engine"
    train = [py, "-m", "apla_train.cli", str(video), "--prompt", args.prompt, "--pretrained", str(pretrained),
             "--out", str(run), "--frames", str(args.frames), "--size", str(args.size),
             "--steps", str(args.train_steps), "--threads", str(args.threads), "--force", "--quiet"]
    for s in list(TRAIN_SETS) + args.sets:
        train += ["--set", s]
    if args.run:
        stages["train"] = {"reused": str(args.run)}
    else:
        stages["train"] = run_child("train", train, args.threads, work / "train.log")
    stages["export"] = run_child("export", [py, "-m", "export.cli", "--run", str(run), "--out", str(engine),
                                            "--force"], args.threads, work / "export.log")

    def worker(kind: str, extra: list[str] | None = None) -> dict:
        result = work / f"{kind}.json"
        cmd = [py, str(Path(__file__).resolve()), "--worker", kind, "--engine-dir", str(engine),
               "--threads", str(args.threads), "--prompt", args.prompt, "--steps", str(args.steps),
               "--result", str(result)] + (extra or [])
        figures = run_child(kind, cmd, args.threads, work / f"{kind}.log")
        return {**figures, **json.loads(result.read_text())}

    weights = worker("weights")
    bare_before = worker("bare")
    generate = worker("generate", ["--out-video", str(work / "generated.mp4")])
    bare_after = worker("bare")
    stages["generate"] = generate
    stages["bare_session"] = {"before": bare_before, "after": bare_after}
    if args.compare_steps > 0:
        out = work / "rt_vs_torch.json"
        cmd = [py, str(ROOT / "benchmarks" / "rt_vs_torch.py"), "--run", str(run), "--engine-dir", str(engine),
               "--steps", str(args.compare_steps), "--threads", str(args.threads), "--json"]
        figures = run_child("rt_vs_torch", cmd + [], args.threads, out.with_suffix(".log"))
        line = [ln for ln in (out.with_suffix(".log")).read_text().splitlines() if ln.startswith("{")][-1]
        stages["rt_vs_torch"] = {**figures, **json.loads(line)}

    unet_bytes = {k: v for k, v in weights.items() if k not in ("wall_s", "peak_rss_gib")}
    weight_bytes = sum(unet_bytes.values())
    bare = min(bare_before["session_s"], bare_after["session_s"])
    load = generate["timings_s"]["load"]
    sizes = {"pretrained": folder_bytes(pretrained), "run": folder_bytes(run), "engine": folder_bytes(engine),
             "engine_files": {p.name: p.stat().st_size for p in sorted(engine.iterdir()) if p.is_file()}}
    report["sizes_bytes"] = sizes
    report["weight_bytes"] = unet_bytes
    report["targets"] = {
        "export_peak_rss_over_unet_bytes": round(stages["export"]["peak_rss_gib"] * GIB / unet_bytes["unet"], 3),
        "engine_folder_over_weight_bytes": round(sizes["engine"] / weight_bytes, 3),
        "load_over_bare_session": round(load / bare, 3),
        "limits": {"export_peak_rss_over_unet_bytes": 2.0, "engine_folder_over_weight_bytes": 1.05,
                   "load_over_bare_session": 1.25},
    }
    t = report["targets"]
    t["met"] = {k: t[k] <= v for k, v in t["limits"].items()}
    path = args.json or work / "sd_scale.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2))
    print(f"[sd_scale] report written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
