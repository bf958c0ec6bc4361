"""The tuned setting against the PyTorch eager sampler, side by side in one run (issue 25 item 6).

    python benchmarks/fastest.py --sd RUN=ENGINE [--tiny RUN=ENGINE ...] [--threads 2]
        [--repeat 1] [--ddim-steps 50] [--reference-steps 500] [--tune-minutes 60]
        [--tune-arg=--steps=10,20 ...] [--unet-size 512] [--unet-frames 8] [--unet-repeat 2]
        [--no-unet-call] [--json OUT.json]

Per model (``--sd``: the SD-1.5-shaped run of ``benchmarks/make_sd_shaped.py``; ``--tiny``: a
tiny run), from the engine folder's start latent with the training prompt, each row in a child
process of its own (its peak RSS is its own; the runtime's children never import torch):

* ``torch fp32``: the PyTorch eager reference sampler (``apla_train.sampling``), DDIM 50;
* ``torch bf16 autocast``: the same under ``torch.autocast("cpu", torch.bfloat16)``;
* ``apla-rt --exact``: DDIM 50 in ONNX Runtime fp32, no tuned setting;
* ``apla-rt tuned fp32``: ``--precision fp32``, whose default is the setting tuned in fp32;
* ``apla-rt tuned``: every default: the setting tuned with every precision that passed.

Columns: sample time (text, loop, decode; the runtime's warm-up counts, its loading does not,
as in ``benchmarks/rt_vs_torch.py``), peak RSS, the speedup over each PyTorch row and, on tiny
models, the frames' PSNR against DDIM ``--reference-steps`` in fp32 from the same start, and on
a case the tune never saw (seeded noise, seed 1): the tuned settings' PSNR against that case's
reference next to DDIM 50's, and whether they stay within the tune's budget of it.

An engine folder without a tuned entry for this machine at ``--threads`` is tuned first
(``apla-rt tune --minutes --tune-minutes`` plus every ``--tune-arg``; this writes the folder's
``tuned.json``); the tuned choice is printed.

Then, with ``--sd``, one guided UNet call (batch 2) at ``--unet-size`` px and ``--unet-frames``
frames per candidate precision of the graph ``generate`` runs: ONNX Runtime fp32, OpenVINO fp32,
OpenVINO bf16 (where the CPU runs bf16), OpenVINO int8 (where the folder holds a checked int8
model): opening, first call, the median of ``--unet-repeat`` calls, peak RSS, each in a child.
The folder's profile is widened in memory for that call only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROWS = ("torch fp32", "torch bf16 autocast", "apla-rt --exact", "apla-rt tuned fp32", "apla-rt tuned")
HELD_OUT_SEED = 1


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------- workers


def worker_torch(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a["threads"])
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample, decode_video
    from export.pipeline import load_run

    _, components, vgt, _ = load_run(Path(a["run"]))  # the run's networks, as apla-export rebuilds them
    start = torch.from_numpy(np.load(a["start"]))
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["bf16"]):
        text = torch.cat([encode_prompts(components, [""]), encode_prompts(components, [a["prompt"]])])
        z = ddim_sample(components.unet, vgt, start, text, components.scheduler, a["steps"],
                        a["guidance"], start_timestep=a["start_timestep"])
        frames = decode_video(components.codec, z.float())
    sample_s = time.perf_counter() - started
    np.save(a["frames"], np.asarray(frames))
    return {"sample_s": sample_s, "peak_rss_mib": _peak_rss_mib(), "setting": f"ddim {a['steps']}"}


def worker_rt(a: dict[str, Any]) -> dict[str, Any]:
    for name in ("torch", "apla_train", "export"):
        sys.modules[name] = None  # type: ignore[assignment]  # the runtime needs none of them
    from apla_rt import Pipeline

    options = {"exact": True} if a["mode"] in ("exact", "reference") else (
        {"precision": "fp32"} if a["mode"] == "tuned fp32" else {})
    fields = {"steps": a["steps"], "scheduler": "ddim", "cache_interval": 1} if a["steps"] else {}
    with Pipeline.open(a["engine"], "auto", a["threads"], **options) as pipe:
        if a["mode"].startswith("tuned") and pipe.tuned is None:
            raise SystemExit(f"{a['engine']} has no tuned setting for this machine at --threads {a['threads']}")
        video, = pipe.generate(a["prompt"], **fields)
        timings = pipe.timings
        sample_s = timings.total - timings.seconds["load"]
        held = pipe.generate(a["prompt"], HELD_OUT_SEED, from_noise=True, **fields)[0] if a["held_out"] else None
        placement = f"{pipe.describe()}, precision {pipe.describe_precision()}"
    np.save(a["frames"], video.frames)
    if held is not None:
        np.save(a["held_frames"], held.frames)
    s = video.settings
    cache = f", cache {s.cache_interval} {s.cache_schedule}" if s.cache_interval > 1 else ""
    return {"sample_s": sample_s, "peak_rss_mib": _peak_rss_mib(), "placement": placement,
            "setting": f"{s.solver} {s.steps}{cache}"}


def worker_unet(a: dict[str, Any]) -> dict[str, Any]:
    """One guided UNet call at the asked size, on the graph generate runs, in one precision."""
    from apla_rt.backends.placement import serving_graph
    from apla_rt.backends.runners import open_runner
    from apla_rt.folder.manifest import Manifest

    manifest = Manifest.open(a["engine"])
    name = serving_graph(manifest, "unet")
    spec = manifest.network(name)
    h = a["size"] // manifest.vae_downsample
    profile = {**spec.profile, "height": (1, h, h), "width": (1, h, h),
               "frames": (1, a["frames"], max(a["frames"], spec.profile["frames"][2]))}
    manifest.networks[name] = dataclasses.replace(spec, profile=profile)
    started = time.perf_counter()
    runner = open_runner(manifest, name, a["backend"], a["threads"], precision=a["precision"])
    open_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    hidden = spec.input("encoder_hidden_states").dims[-1]
    feeds = {"sample": rng.standard_normal((2, manifest.latent_channels, a["frames"], h, h)).astype(np.float32),
             "timestep": np.array([500, 500], np.int64),
             "encoder_hidden_states": rng.standard_normal((2, manifest.model_max_length, hidden)).astype(np.float32)}
    started = time.perf_counter()
    runner.run(feeds)
    first_s = time.perf_counter() - started
    times = []
    for _ in range(a["repeat"]):
        started = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - started)
    runner.close()
    return {"graph": name, "open_s": open_s, "first_s": first_s, "call_s": statistics.median(times),
            "peak_rss_mib": _peak_rss_mib()}


WORKERS = {"torch": worker_torch, "rt": worker_rt, "unet": worker_unet}


# --------------------------------------------------------------------------- parent


def child(kind: str, args: dict[str, Any], threads: int, tmp: Path) -> dict[str, Any]:
    """Run a worker in a child process; its result, or {"error": ...}."""
    spec, out = tmp / f"{kind}-args.json", tmp / f"{kind}-result.json"
    spec.write_text(json.dumps(args))
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                           "--args", str(spec), "--result", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(out.read_text())


def tuned_entry(engine: Path, threads: int) -> dict[str, Any] | None:
    from apla_rt.backends.choice import machine_key
    from apla_rt.folder.manifest import Manifest
    from apla_rt.folder.tuned import tuned_entry as entry_for

    manifest = Manifest.open(engine)
    return entry_for(manifest.root, machine_key(manifest, threads))


def ensure_tuned(engine: Path, opts: argparse.Namespace, log: Any) -> tuple[dict[str, Any], float | None]:
    """The folder's tuned entry for this machine, tuning it first where it has none."""
    entry = tuned_entry(engine, opts.threads)
    if entry is not None:  # an incomplete one (out of time) too: the report says so
        return entry, None
    log(f"{engine}: no tuned setting for this machine at {opts.threads} threads; apla-rt tune first")
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "apla_rt.cli", "tune", "--engine-dir", str(engine), "--threads",
           str(opts.threads), "--minutes", str(opts.tune_minutes), *opts.tune_arg]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"apla-rt tune failed on {engine}: {proc.stderr.strip()[-500:]}")
    entry = tuned_entry(engine, opts.threads)
    assert entry is not None
    return entry, time.perf_counter() - started


def start_of(engine: Path, tmp: Path) -> tuple[Path, int, str, float]:
    """The folder's start latent saved for the PyTorch side, its timestep, prompt and guidance."""
    from apla_rt.folder.latents import StartLatents
    from apla_rt.folder.manifest import Manifest

    manifest = Manifest.open(engine)
    if manifest.start_latent_path is None:
        raise SystemExit(f"{engine} has no start latent")
    start = StartLatents(manifest, False).resolve(None, 0, False, None)
    path = tmp / "start.npy"
    np.save(path, start.start)
    defaults = manifest.sampling_defaults()
    assert start.timestep is not None and manifest.prompt and defaults.guidance is not None
    return path, start.timestep, manifest.prompt, defaults.guidance


def measure_model(name: str, run: Path, engine: Path, tiny: bool, opts: argparse.Namespace,
                  tmp: Path, log: Any) -> dict[str, Any]:
    """The five rows on one model (module docstring), ``--repeat`` rounds in turns."""
    from apla_rt.media.video import psnr

    entry, tune_s = ensure_tuned(engine, opts, log)
    start, t0, prompt, guidance = start_of(engine, tmp)
    common = {"threads": opts.threads, "prompt": prompt}
    specs = {"torch fp32": ("torch", {"bf16": False}), "torch bf16 autocast": ("torch", {"bf16": True}),
             "apla-rt --exact": ("rt", {"mode": "exact", "steps": opts.ddim_steps}),
             "apla-rt tuned fp32": ("rt", {"mode": "tuned fp32", "steps": None}),
             "apla-rt tuned": ("rt", {"mode": "tuned", "steps": None})}
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    for r in range(opts.repeat):
        for row in ROWS[r % len(ROWS):] + ROWS[:r % len(ROWS)]:
            kind, extra = specs[row]
            slug = row.replace(" ", "_").replace("-", "")
            args = {**common, **extra, "frames": str(tmp / f"{slug}.npy"),
                    "held_frames": str(tmp / f"{slug}-held.npy"), "held_out": tiny and r == 0}
            if kind == "torch":
                args.update(run=str(run), start=str(start), start_timestep=t0, steps=opts.ddim_steps,
                            guidance=guidance)
            else:
                args["engine"] = str(engine)
            log(f"{name}: {row} (round {r + 1} of {opts.repeat})")
            results[row].append(child(kind, args, opts.threads, tmp))
    rows = {row: _median(rs) for row, rs in results.items()}
    if tiny:
        _distances(rows, engine, opts, tmp, common, psnr, log)
    return {"model": name, "run": str(run), "engine": str(engine), "start_timestep": t0,
            "tune_s": tune_s, "tuned": _tuned_summary(entry), "rows": rows}


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out = dict(ok[0])
    for key in ("sample_s", "peak_rss_mib"):
        out[key] = float(statistics.median(r[key] for r in ok))
    out["runs_s"] = [round(r["sample_s"], 3) for r in ok]
    return out


def _distances(rows: dict[str, dict[str, Any]], engine: Path, opts: argparse.Namespace, tmp: Path,
               common: dict[str, Any], psnr: Any, log: Any) -> None:
    """PSNR of each row's frames against DDIM --reference-steps fp32, and on the held-out case."""
    log(f"{engine}: the reference, DDIM {opts.reference_steps} fp32")
    ref = child("rt", {**common, "engine": str(engine), "mode": "reference", "steps": opts.reference_steps,
                       "frames": str(tmp / "ref.npy"), "held_frames": str(tmp / "ref-held.npy"),
                       "held_out": True}, opts.threads, tmp)
    if "error" in ref:
        raise SystemExit(f"the reference run failed: {ref['error']}")
    reference, held_ref = np.load(tmp / "ref.npy"), np.load(tmp / "ref-held.npy")
    for row, result in rows.items():
        if "error" in result:
            continue
        slug = row.replace(" ", "_").replace("-", "")
        result["psnr_ref_db"] = round(psnr(np.load(tmp / f"{slug}.npy"), reference), 2)
        held = tmp / f"{slug}-held.npy"
        if held.exists():
            result["held_out_psnr_ref_db"] = round(psnr(np.load(held), held_ref), 2)


def _tuned_summary(entry: dict[str, Any]) -> dict[str, Any]:
    return {"budget_db": entry.get("budget_db"), "complete": entry.get("complete"),
            "baseline": entry.get("baseline"),
            "modes": {m: {k: v for k, v in e.items() if k in ("setting", "seconds", "speedup", "psnr", "placement")}
                      for m, e in entry.get("modes", {}).items()}}


def unet_calls(engine: Path, opts: argparse.Namespace, tmp: Path, log: Any) -> list[dict[str, Any]]:
    """One guided UNet call per candidate precision at --unet-size px, --unet-frames frames."""
    from apla_rt.backends import precision as cpu_precision
    from apla_rt.backends.placement import serving_graph
    from apla_rt.folder.manifest import Manifest

    manifest = Manifest.open(engine)
    graph = serving_graph(manifest, "unet")
    candidates: list[tuple[str, str, str | None]] = [("ort", "fp32", None)]
    try:
        from apla_rt.backends.openvino import openvino_status, ov_capabilities
        from apla_rt.backends.precision import int8_available

        ok, why = openvino_status()
    except ImportError as err:
        ok, why = False, str(err)
    if ok:
        bf16 = cpu_precision.bf16_unavailable(cpu_precision.probe_cpu(), ov_capabilities())
        int8_ok, int8_why = int8_available(manifest, graph)
        candidates += [("openvino", "fp32", None), ("openvino", "bf16", bf16),
                       ("openvino", "int8", None if int8_ok else int8_why)]
    else:
        candidates += [("openvino", p, why) for p in ("fp32", "bf16", "int8")]
    out = []
    for backend, precision, absent in candidates:
        row: dict[str, Any] = {"backend": backend, "precision": precision}
        if absent is not None:
            out.append({**row, "absent": absent})
            continue
        log(f"UNet call at {opts.unet_size} px, {opts.unet_frames} frames: {backend} {precision}")
        out.append({**row, **child("unet", {"engine": str(engine), "backend": backend, "precision": precision,
                                            "threads": opts.threads, "size": opts.unet_size,
                                            "frames": opts.unet_frames, "repeat": opts.unet_repeat},
                                   opts.threads, tmp)})
    return out


# --------------------------------------------------------------------------- report


def print_model(m: dict[str, Any]) -> None:
    rows, tuned = m["rows"], m["tuned"]
    print(f"\n{m['model']}: {m['engine']} (start t={m['start_timestep']})"
          + (f"; tuned first in {m['tune_s']:.0f} s" if m["tune_s"] else ""))
    for mode, e in tuned["modes"].items():
        psnrs = ", ".join(f"{c} {v:.2f}" for c, v in e.get("psnr", {}).items())
        print(f"  tuned ({mode}): {e.get('setting')} on {e.get('placement', {}).get('precision')}: "
              f"{e.get('speedup')}x DDIM 50 fp32 in the tune; PSNR vs its reference {psnrs} dB "
              f"(budget {tuned['budget_db']} dB{'' if tuned['complete'] else ', tune incomplete'})")
    torch32, torch16 = rows["torch fp32"].get("sample_s"), rows["torch bf16 autocast"].get("sample_s")
    print(f"  {'row':22} {'setting':26} {'sample s':>9} {'x torch':>8} {'x bf16':>7} {'peak RSS MiB':>12}"
          f" {'PSNR ref':>9} {'held-out':>9}")
    for name, r in rows.items():
        if "error" in r:
            print(f"  {name:22} error: {r['error']}")
            continue
        x32 = f"{torch32 / r['sample_s']:.2f}" if torch32 else "-"
        x16 = f"{torch16 / r['sample_s']:.2f}" if torch16 else "-"
        ref = f"{r['psnr_ref_db']:.2f}" if "psnr_ref_db" in r else "-"
        held = f"{r['held_out_psnr_ref_db']:.2f}" if "held_out_psnr_ref_db" in r else "-"
        print(f"  {name:22} {r.get('setting', ''):26} {r['sample_s']:>9.2f} {x32:>8} {x16:>7} "
              f"{r['peak_rss_mib']:>12.0f} {ref:>9} {held:>9}")
    ddim, budget = rows["apla-rt --exact"].get("held_out_psnr_ref_db"), tuned["budget_db"]
    for name in ("apla-rt tuned fp32", "apla-rt tuned"):
        held = rows[name].get("held_out_psnr_ref_db")
        if ddim is not None and held is not None:
            verdict = "within" if held >= ddim - budget else "NOT within"
            print(f"  held-out (noise, seed {HELD_OUT_SEED}): {name} {held:.2f} dB vs DDIM 50 {ddim:.2f} dB: "
                  f"{verdict} the {budget} dB budget")


def print_unet(calls: list[dict[str, Any]], opts: argparse.Namespace) -> None:
    print(f"\none guided UNet call (batch 2) at {opts.unet_size} px, {opts.unet_frames} frames:")
    base = next((c["call_s"] for c in calls if c["backend"] == "ort" and "call_s" in c), None)
    for c in calls:
        name = f"{'ONNX Runtime' if c['backend'] == 'ort' else 'OpenVINO'} {c['precision']}"
        if "call_s" in c:
            ratio = f" ({base / c['call_s']:.2f}x ORT fp32)" if base else ""
            print(f"  {name:18} {c['call_s']:8.2f} s{ratio}; open {c['open_s']:.1f} s, first call "
                  f"{c['first_s']:.1f} s, peak RSS {c['peak_rss_mib']:.0f} MiB ({c['graph']})")
        else:
            print(f"  {name:18} {c.get('absent') or 'error: ' + c.get('error', '?')}")


def _pair(text: str) -> tuple[Path, Path]:
    run, sep, engine = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected RUN=ENGINE, got {text!r}")
    return Path(run), Path(engine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd", type=_pair, help="the SD-1.5-shaped RUN=ENGINE")
    p.add_argument("--tiny", type=_pair, action="append", default=[], help="a tiny RUN=ENGINE (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="rounds of the five rows, in turns; medians")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--reference-steps", type=int, default=500, help="tiny models' reference DDIM steps")
    p.add_argument("--tune-minutes", type=float, default=60.0)
    p.add_argument("--tune-arg", action="append", default=[], help="passed to apla-rt tune (repeatable)")
    p.add_argument("--unet-size", type=int, default=512)
    p.add_argument("--unet-frames", type=int, default=8)
    p.add_argument("--unet-repeat", type=int, default=2)
    p.add_argument("--no-unet-call", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        result = WORKERS[opts.worker](json.loads(Path(opts.args).read_text()))
        Path(opts.result).write_text(json.dumps(result))
        return 0
    if opts.sd is None and not opts.tiny:
        p.error("give --sd RUN=ENGINE and/or --tiny RUN=ENGINE")
    if opts.repeat < 1:
        p.error("--repeat must be at least 1")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    from benchmarks.cpu_backends import lscpu

    cpu = lscpu()
    report: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                              "lscpu": cpu, "threads": opts.threads, "models": []}
    with tempfile.TemporaryDirectory(prefix="fastest-") as name:
        tmp = Path(name)
        for label, pair, tiny in ([("sd", opts.sd, False)] if opts.sd else []) + [
                (f"tiny {p[1].name}", p, True) for p in opts.tiny]:
            report["models"].append(measure_model(label, pair[0], pair[1], tiny, opts, tmp, log))
        if opts.sd and not opts.no_unet_call:
            report["unet_call"] = unet_calls(opts.sd[1], opts, tmp, log)
    print(f"{report['date']}; lscpu: {cpu['model']}; flags: {cpu['flags']}")
    print(f"{opts.threads} threads; {opts.ddim_steps} DDIM steps for the PyTorch and --exact rows; "
          f"median of {opts.repeat} round(s)")
    for m in report["models"]:
        print_model(m)
    if "unet_call" in report:
        print_unet(report["unet_call"], opts)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
