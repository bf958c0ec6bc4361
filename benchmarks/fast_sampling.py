"""Fidelity against cost of the runtime's sampling settings: solver x steps x cache x guidance.

    python benchmarks/fast_sampling.py --tiny RUN=ENGINE [--tiny RUN2=ENGINE2 ...]
        [--edit-prompt TEXT ...] [--sd RUN=ENGINE] [--threads 2] [--json OUT.json] [--quick]

For each tiny run (``--tiny``, a trained run and its exported engine folder) three cases,
each sampled from one start latent and start timestep by every setting:

* ``recon``: the engine folder's DDIM-inverted latent with the training prompt;
* ``edit``: the same latent with an edit prompt (``--edit-prompt``, one per ``--tiny``);
* ``noise``: seeded Gaussian noise from the schedule's top timestep, the training prompt.

Settings (rows): DDIM at 50 and 25 steps; ``dpmpp-2m`` and ``unipc`` at 10, 15, 20, 25; each
with cache interval 1, 2, 3, 5 and the guidance interval off and on (``--guidance-interval``).
Columns: the UNet cost per video in full-UNet-call equivalents (one unit = one full UNet
evaluation of one video's guided batch, so DDIM 50 costs 50; each graph's FLOPs counted once
per row with torch's FlopCounter, through ``apla_train``'s UNet functions, and the UNet rows
each graph actually ran counted in the runtime's calls), the wall time of ``generate`` (text,
loop, decode), PSNR of the decoded frames and RMSE of the final latents against the
**reference solution, DDIM at 500 steps from the same start latent and start timestep**, and,
for ``recon``, PSNR against the source clip.

Every setting of a case integrates from the same start timestep to the same end (the
runtime's one grid rule), so the table measures the solver and the cache, not the grid.

The chosen settings: the cheapest that is at least as close to the reference (frames PSNR)
as DDIM 50 in all three cases of the first tiny run (the run's default), and per start kind
(inverted latent, noise) the fastest within 1 dB of DDIM 50's PSNR in every case of that kind
on every tiny run. With ``--sd RUN=ENGINE`` (an SD-1.5-shaped run, ``benchmarks/
make_sd_shaped.py``: random weights, so cost only) the per-kind choices are timed against the
PyTorch eager reference sampler at DDIM 50 on that model and start latent, side by side
(``benchmarks/rt_vs_torch.py``'s worker in a child process, the runtime in this process tree),
and every row's cost is given with the SD-shaped graphs' FLOPs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE_STEPS = 500
CASES = ("recon", "edit", "noise")
STEPS = (10, 15, 20, 25)
CACHE = (1, 2, 3, 5)
DEFAULT_INTERVAL = (0.0, 0.5)
EDIT_PROMPTS = {"a man is skiing": "mickey mouse is skiing on the snow",
                "a jeep car is moving on the road": "a jeep car is moving on the beach"}


@dataclass(frozen=True)
class Setting:
    scheduler: str
    steps: int
    cache_interval: int = 1
    guidance_interval: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        gi = "" if self.guidance_interval is None else " gi {:g}:{:g}".format(*self.guidance_interval)
        cache = "" if self.cache_interval == 1 else f" cache {self.cache_interval}"
        return f"{self.scheduler} {self.steps}{cache}{gi}"

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheduler": self.scheduler, "steps": self.steps}
        if self.cache_interval != 1:
            out["cache_interval"] = self.cache_interval
        if self.guidance_interval is not None:
            out["guidance_interval"] = self.guidance_interval
        return out


def settings(quick: bool, interval: tuple[float, float], cache: bool) -> list[Setting]:
    base = [("ddim", 50), ("ddim", 25)] + [(s, n) for s in ("dpmpp-2m", "unipc")
                                           for n in ((10, 20) if quick else STEPS)]
    caches = ((1, 3) if quick else CACHE) if cache else (1,)
    return [Setting(s, n, c, gi) for (s, n), c, gi in itertools.product(base, caches, (None, interval))]


# --------------------------------------------------------------------------- measuring


def cpu_info() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {"model": platform.processor(), "flags": ""}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {"model": fields.get("Model name", "").strip(), "flags": fields.get("Flags", "").strip(),
            "cpus": fields.get("CPU(s)", "").strip()}


class RowCounter:
    """Counts the rows each UNet graph ran in the sampling loop (wraps the ``unet`` method of
    one pipeline's runner pool, which the loop calls and the warm-up does not)."""

    def __init__(self, engine: Any):
        self.rows: dict[str, int] = {}
        inner = engine.pool.unet

        def counted(graph: str, feeds: dict[str, np.ndarray], halves: bool) -> dict[str, np.ndarray]:
            self.rows[graph] = self.rows.get(graph, 0) + int(feeds["sample"].shape[0])
            return inner(graph, feeds, halves)

        engine.pool.unet = counted

    def take(self) -> dict[str, int]:
        rows, self.rows = self.rows, {}
        return rows


def graph_flops(run: Path, latent_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs of one batch row of each UNet graph at ``latent_shape`` (1, c, f, h, w)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from apla_train import deepcache
    from export.pipeline import load_run

    cfg, components, vgt, _ = load_run(run)
    unet = components.unet.eval()
    z = torch.zeros(latent_shape)
    t = torch.full((1,), 500, dtype=torch.long)
    text = torch.zeros((1, components.text_encoder.config.max_position_embeddings,
                        components.text_encoder.config.hidden_size))
    flops: dict[str, float] = {}

    def count(fn: Any) -> tuple[float, Any]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = fn()
        return float(counter.get_total_flops()), out

    flops["unet"], _ = count(lambda: unet(z, t, text))
    flops["unet_deep"], (_, feature) = count(lambda: deepcache.unet_with_feature(unet, z, t, text))
    flops["unet_shallow"], _ = count(lambda: deepcache.unet_shallow(unet, z, t, text, feature))
    return flops


def cost(rows: dict[str, int], flops: dict[str, float], videos: int = 1) -> float:
    """UNet cost per video in full-UNet-call equivalents (2 rows of the full UNet = 1)."""
    spent = sum(n * flops.get(name, flops["unet"]) for name, n in rows.items())
    return spent / (2 * flops["unet"]) / videos


def latent_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


@dataclass
class Case:
    run: str
    name: str  # recon | edit | noise
    prompt: str
    from_noise: bool
    seed: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    torch_ddim50_s: float | None = None  # the PyTorch eager sampler at DDIM 50, same start


def source_frames(run: Path) -> np.ndarray:
    """The training clip's frames as the run read them."""
    from apla_train.config import from_dict
    from apla_train.run import read_clip

    cfg = from_dict(json.loads((run / "config.json").read_text())).validate()
    return read_clip(cfg)


def measure_tiny(run: Path, engine_dir: Path, edit_prompt: str, grid: list[Setting],
                 threads: int, log: Any, only: tuple[str, ...] = CASES) -> tuple[list[Case], dict[str, float]]:
    from apla_rt import Pipeline
    from apla_rt.media.video import psnr

    frames_src = source_frames(run)
    cases: list[Case] = []
    with Pipeline.open(engine_dir, "ort", threads) as pipe:
        counter = RowCounter(pipe.engine)
        prompt = pipe.manifest.prompt
        shape = pipe.manifest.start_latent_shape()
        assert shape is not None, f"{engine_dir} has no start latent"
        flops = graph_flops(run, tuple(int(s) for s in shape))
        for name, text, from_noise in (("recon", prompt, False), ("edit", edit_prompt, False),
                                       ("noise", prompt, True)):
            if name not in only:
                continue
            case = Case(run.name, name, text, from_noise)
            ref, = pipe.generate(text, seeds=0, from_noise=from_noise, scheduler="ddim",
                                 steps=REFERENCE_STEPS)
            counter.take()
            log(f"[{run.name}/{name}] reference: DDIM {REFERENCE_STEPS}")
            for s in grid:
                started = time.perf_counter()
                video, = pipe.generate(text, seeds=0, from_noise=from_noise, **s.kwargs())
                wall = time.perf_counter() - started
                rows = counter.take()
                row = {"setting": s.label, **s.kwargs(), "cost": round(cost(rows, flops), 3),
                       "unet_rows": rows,
                       "wall_s": round(wall, 3),
                       "psnr_ref_db": finite(psnr(video.frames, ref.frames)),
                       "rmse_ref": latent_rmse(video.latents, ref.latents)}
                if name == "recon":
                    row["psnr_src_db"] = finite(psnr(video.frames, frames_src))
                case.rows.append(row)
                log(f"[{run.name}/{name}] {s.label:<28} cost {row['cost']:6.2f}  {wall:6.2f} s  "
                    f"{row['psnr_ref_db']} dB")
            if name == "recon":
                case.rows.append({"setting": f"reference DDIM {REFERENCE_STEPS}",
                                  "psnr_src_db": finite(psnr(ref.frames, frames_src))})
            if name != "edit" or "recon" not in only:  # the edit prompt costs what recon's does
                log(f"[{run.name}/{name}] PyTorch eager DDIM 50")
                case.torch_ddim50_s = torch_ddim50(run, engine_dir, text, from_noise, threads)
            cases.append(case)
    by_start = {c.from_noise: c.torch_ddim50_s for c in cases if c.torch_ddim50_s is not None}
    assert all(c.from_noise in by_start for c in cases)
    for case in cases:
        case.torch_ddim50_s = by_start[case.from_noise]
        for row in case.rows:
            if "wall_s" in row:
                row["speedup_vs_torch_ddim50"] = round(case.torch_ddim50_s / row["wall_s"], 2)
    return cases, flops


# --------------------------------------------------------------------------- choosing


def _by_setting(case: Case) -> dict[str, dict[str, Any]]:
    return {r["setting"]: r for r in case.rows if "cost" in r}


def cheapest_at_least_ddim50(cases: list[Case]) -> dict[str, Any] | None:
    """The cheapest setting at least as close to the reference as DDIM 50 in every case."""
    tables = [_by_setting(c) for c in cases]
    base = [t["ddim 50"]["psnr_ref_db"] for t in tables]
    ok = [label for label in tables[0]
          if all(t[label]["psnr_ref_db"] is not None and t[label]["psnr_ref_db"] >= b
                 for t, b in zip(tables, base))]
    if not ok:
        return None
    best = min(ok, key=lambda label: (max(t[label]["cost"] for t in tables), label))
    return {"setting": best, **{f"{c.run}/{c.name}": _by_setting(c)[best]["psnr_ref_db"] for c in cases},
            "cost": tables[0][best]["cost"], "ddim50": dict(zip((f"{c.run}/{c.name}" for c in cases), base))}


def fastest_within(cases: list[Case], margin_db: float = 1.0,
                   cache: bool = True) -> dict[str, Any] | None:
    """The cheapest setting within ``margin_db`` of DDIM 50's PSNR in every case given
    (``cache=False``: among those without the cache)."""
    tables = [_by_setting(c) for c in cases]
    base = [t["ddim 50"]["psnr_ref_db"] for t in tables]
    ok = [label for label in tables[0]
          if (cache or tables[0][label].get("cache_interval", 1) == 1) and all(t[label]["psnr_ref_db"] is not None and t[label]["psnr_ref_db"] >= b - margin_db
                 for t, b in zip(tables, base))]
    if not ok:
        return None
    best = min(ok, key=lambda label: (max(t[label]["cost"] for t in tables), label))
    row = tables[0][best]
    return {"setting": best, "kwargs": {k: row[k] for k in ("scheduler", "steps", "cache_interval",
                                                            "guidance_interval") if k in row},
            "cost": row["cost"], "psnr": {f"{c.run}/{c.name}": _by_setting(c)[best]["psnr_ref_db"]
                                          for c in cases}}


# --------------------------------------------------------------------------- SD shape


def torch_ddim50(run: Path, engine_dir: Path, prompt: str, from_noise: bool, threads: int) -> float:
    """Sample seconds of the PyTorch eager reference sampler at DDIM 50 (text, loop, decode),
    in a child process (``benchmarks/rt_vs_torch.py``'s worker), from the start latent the
    runtime uses for the same case."""
    from apla_rt.folder.latents import StartLatents, timestep_path_for
    from apla_rt.folder.manifest import Manifest

    manifest = Manifest.open(engine_dir)
    start = StartLatents(manifest, False).resolve(None, 0, from_noise, None)
    guidance = manifest.sampling_defaults().guidance
    guidance = 12.5 if guidance is None else guidance
    with tempfile.TemporaryDirectory(prefix="fast-sampling-") as name:
        tmp = Path(name)
        np.save(tmp / "start.npy", start.start)
        timestep_path_for(tmp / "start.npy").write_text(json.dumps({"timestep": start.timestep}))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "rt_vs_torch.py"), "--worker", "torch",
               "--run", str(run), "--engine-dir", str(engine_dir), "--steps", "50",
               "--guidance", repr(guidance), "--threads", str(threads), "--prompt", prompt,
               "--negative-prompt", "", "--start", str(tmp / "start.npy"),
               "--latents", str(tmp / "torch.npy"), "--frames-out", str(tmp / "torch-frames.npy"),
               "--result", str(tmp / "torch.json")]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the torch worker failed:\n{proc.stderr[-3000:]}")
        return float(json.loads((tmp / "torch.json").read_text())["sample_s"])


def time_sd(run: Path, engine_dir: Path, choice: dict[str, Any], from_noise: bool, threads: int,
            log: Any) -> dict[str, Any]:
    """The runtime at ``choice`` against PyTorch eager DDIM 50, same model and start latent."""
    from apla_rt import Pipeline

    with Pipeline.open(engine_dir, "ort", threads) as pipe:
        prompt = pipe.manifest.prompt
        counter = RowCounter(pipe.engine)
        log(f"[sd] runtime {choice['setting']} ({'noise' if from_noise else 'inverted latent'})")
        started = time.perf_counter()
        pipe.generate(prompt, seeds=0, from_noise=from_noise, **choice["kwargs"])
        rt_s = time.perf_counter() - started
        rows = counter.take()
    log(f"[sd] PyTorch eager DDIM 50 ({'noise' if from_noise else 'inverted latent'})")
    torch_s = torch_ddim50(run, engine_dir, prompt, from_noise, threads)
    return {"from": "noise" if from_noise else "inverted latent", "setting": choice["setting"],
            "torch_ddim50_s": round(torch_s, 2), "rt_s": round(rt_s, 2),
            "speedup": round(torch_s / rt_s, 2), "rt_unet_rows": rows}


# --------------------------------------------------------------------------- report


def print_case(case: Case) -> None:
    print(f"\n{case.run} / {case.name} ({'noise' if case.from_noise else 'inverted latent'}, "
          f"\"{case.prompt}\"), against DDIM {REFERENCE_STEPS} from the same start")
    print(f"PyTorch eager DDIM 50: {case.torch_ddim50_s:.2f} s")
    print(f"{'setting':<30} {'cost':>6} {'wall s':>7} {'x torch':>7} {'PSNR ref':>9} {'RMSE ref':>9} "
          f"{'PSNR src':>9}")
    for r in case.rows:
        if "cost" not in r:
            print(f"{r['setting']:<30} {'':>6} {'':>7} {'':>7} {'':>9} {'':>9} {r['psnr_src_db']!s:>9}")
            continue
        print(f"{r['setting']:<30} {r['cost']:>6.2f} {r['wall_s']:>7.2f} "
              f"{r['speedup_vs_torch_ddim50']:>7.2f} {r['psnr_ref_db']!s:>9} "
              f"{r['rmse_ref']:>9.2e} {r.get('psnr_src_db', '')!s:>9}")


def parse_pair(text: str) -> tuple[Path, Path]:
    run, sep, engine = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected RUN=ENGINE, got {text!r}")
    return Path(run), Path(engine)


def parse_interval(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}")
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", type=parse_pair, action="append", required=True, metavar="RUN=ENGINE")
    p.add_argument("--edit-prompt", action="append", default=[], help="one per --tiny")
    p.add_argument("--other-cases", default=",".join(CASES),
                   help="the cases of every --tiny after the first (comma-separated; default all)")
    p.add_argument("--sd", type=parse_pair, metavar="RUN=ENGINE", help="SD-1.5-shaped run (cost only)")
    p.add_argument("--guidance-interval", type=parse_interval, default=DEFAULT_INTERVAL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    p.add_argument("--no-cache", action="store_true", help="only cache interval 1")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    grid = settings(args.quick, args.guidance_interval, not args.no_cache)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "cpu": cpu_info(), "threads": args.threads,
                              "reference_steps": REFERENCE_STEPS,
                              "guidance_interval": list(args.guidance_interval), "cases": []}
    all_cases: list[Case] = []
    for i, (run, engine) in enumerate(args.tiny):
        from apla_rt.folder.manifest import Manifest

        prompt = Manifest.open(engine).prompt
        edit = (args.edit_prompt[i] if i < len(args.edit_prompt)
                else EDIT_PROMPTS.get(prompt, prompt + ", cartoon style"))
        only = CASES if i == 0 else tuple(c for c in args.other_cases.split(",") if c)
        unknown = set(only) - set(CASES)
        if unknown:
            p.error(f"--other-cases: unknown {sorted(unknown)}; use {', '.join(CASES)}")
        cases, flops = measure_tiny(run, engine, edit, grid, args.threads, log, only)
        report.setdefault("tiny_flops", {})[run.name] = flops
        for case in cases:
            print_case(case)
        all_cases += cases
    report["cases"] = [case.__dict__ for case in all_cases]
    first = [c for c in all_cases if c.run == args.tiny[0][0].name]
    report["default"] = cheapest_at_least_ddim50(first)
    inverted = [c for c in all_cases if not c.from_noise]
    noise = [c for c in all_cases if c.from_noise]
    report["fastest_within_1db"] = {"inverted": fastest_within(inverted), "noise": fastest_within(noise)}
    print("\ncheapest setting at least as close as DDIM 50 in all three cases of the first run:",
          json.dumps(report["default"]))
    print("fastest within 1 dB of DDIM 50:", json.dumps(report["fastest_within_1db"]))

    if args.sd is not None:
        run, engine = args.sd
        from apla_rt.folder.manifest import Manifest

        shape = Manifest.open(engine).start_latent_shape()
        assert shape is not None
        sd_flops = graph_flops(run, tuple(int(s) for s in shape))
        report["sd_flops"] = sd_flops
        report["sd_shallow_share"] = round(sd_flops["unet_shallow"] / sd_flops["unet"], 4)
        # the rows each graph runs depend on the setting only, not on the model
        report["sd_cost"] = {r["setting"]: round(cost(r["unet_rows"], sd_flops), 3)
                             for r in first[0].rows if "cost" in r}
        report["sd_timing"] = []
        sd_has_cache = Manifest.open(engine).has("unet_shallow")
        for kind, from_noise in (("inverted", False), ("noise", True)):
            choice = report["fastest_within_1db"][kind]
            if choice is not None and not sd_has_cache and choice["kwargs"].get("cache_interval", 1) > 1:
                log(f"[sd] {engine} has no cache graphs: timing the fastest setting without the cache")
                choice = fastest_within(inverted if kind == "inverted" else noise, cache=False)
            if choice is None:
                continue
            report["sd_timing"].append(time_sd(run, engine, choice, from_noise, args.threads, log))
        print("\nSD-1.5-shaped:", json.dumps({k: report[k] for k in ("sd_shallow_share", "sd_timing")}))
    if args.json is not None:
        from apla_rt.folder.atomic import write_file

        write_file(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=1)), force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
