"""What opening an engine folder costs the runtime: memory with and without the DeepCache graphs,
the feature graph's call against the plain UNet's, and a pipeline's first cached ``generate``
against the next one.

    python benchmarks/open_cost.py --engine-dir ENGINES [--threads 2] [--steps 20]
        [--solver unipc] [--cache-interval 3] [--backend ort-cpu] [--precision fp32] [--json OUT]

Each measurement runs in a child process of its own, so that one's memory is not the next's:

* ``rss``: resident memory after ``Pipeline.open`` without the cache graphs, and with them
  (``cache=True``), and after one cached ``generate`` on top (targets: with <= 1.1x without;
  issue 25). The UNet's full calls run on the feature graph either way (``placement.serving_graph``),
  so the cache adds the shallow graph only.
* ``calls``: one guided UNet call (batch 2 at the start latent's shape, median of ``--repeat``
  after one warm-up) on the plain ``unet`` graph and on ``unet_feature`` (target: no slower).
* ``first``: a pipeline opened with the cache graphs, then the same cached ``generate`` twice:
  the first against the second (target <= 1.1x; issue 23: nothing opens or warms up inside
  sampling).

Prints one JSON object (and writes it to ``--json``), with the machine's ``lscpu`` model and flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _settings(args: argparse.Namespace) -> Any:
    from apla_rt import SamplingSettings

    return SamplingSettings(steps=args.steps, solver=args.solver, cache_interval=args.cache_interval)


def child_rss(args: argparse.Namespace) -> dict[str, Any]:
    from apla_rt import Pipeline

    out: dict[str, Any] = {"before_mib": _rss_mib()}
    with Pipeline.open(args.engine_dir, args.backend, args.threads, precision=args.precision,
                       cache=args.cache) as pipe:
        out["open_mib"] = _rss_mib()
        out["runners"] = sorted(pipe.engine.runners)
        if args.cache:
            pipe.generate(pipe.manifest.prompt or "", settings=_settings(args))
            out["after_cached_generate_mib"] = _rss_mib()
    return out


def child_calls(args: argparse.Namespace) -> dict[str, Any]:
    from apla_rt.backends.runners import open_runner
    from apla_rt.folder.manifest import Manifest

    manifest = Manifest.open(args.engine_dir)
    shape = manifest.start_latent_shape() or (1, manifest.latent_channels, manifest.frame_range()[1],
                                              *manifest.latent_size())
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for graph in ("unet", "unet_feature"):
        runner = open_runner(manifest, graph, args.backend_kind, args.threads, precision=args.kind_precision)
        spec = runner.spec
        hidden = spec.input("encoder_hidden_states").shape({**{d: r[1] for d, r in spec.profile.items()},
                                                            "batch": 2})
        feeds = {"sample": rng.standard_normal((2, *shape[1:])).astype(np.float32),
                 "timestep": np.array([500, 500], np.int64),
                 "encoder_hidden_states": rng.standard_normal(hidden).astype(np.float32)}
        runner.run(feeds)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            runner.run(feeds)
            times.append(time.perf_counter() - t0)
        out[f"{graph}_s"] = statistics.median(times)
        runner.close()
    out["feature_vs_plain"] = out["unet_feature_s"] / out["unet_s"]
    return out


def child_first(args: argparse.Namespace) -> dict[str, Any]:
    from apla_rt import Pipeline

    out: dict[str, Any] = {}
    started = time.perf_counter()
    with Pipeline.open(args.engine_dir, args.backend, args.threads, precision=args.precision,
                       cache=True) as pipe:
        out["open_s"] = time.perf_counter() - started
        prompt = pipe.manifest.prompt or ""
        for key in ("first_s", "second_s"):
            t0 = time.perf_counter()
            pipe.generate(prompt, settings=_settings(args))
            out[key] = time.perf_counter() - t0
        out["stages"] = pipe.timings.as_dict()
    out["first_vs_second"] = out["first_s"] / out["second_s"]
    return out


CHILDREN = {"rss": child_rss, "calls": child_calls, "first": child_first}


def _run_child(args: argparse.Namespace, kind: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *sys.argv[1:], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="unipc")
    p.add_argument("--cache-interval", type=int, default=3)
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=sorted(CHILDREN))
    p.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backend_kind = "ort" if args.backend == "ort-cpu" else args.backend
    args.kind_precision = "fp32" if args.precision == "auto" else args.precision
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    from benchmarks.cpu_backends import lscpu

    without = _run_child(args, "rss")
    with_cache = _run_child(args, "rss", "--cache")
    report = {"machine": {**lscpu(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
              "engine_dir": str(args.engine_dir), "threads": args.threads,
              "rss_without_cache_mib": round(without["open_mib"], 1),
              "rss_with_cache_mib": round(with_cache["open_mib"], 1),
              "rss_after_cached_generate_mib": round(with_cache["after_cached_generate_mib"], 1),
              "rss_ratio": round(with_cache["after_cached_generate_mib"] / without["open_mib"], 3),
              "runners_without": without["runners"], "runners_with": with_cache["runners"],
              "calls": _run_child(args, "calls"), "first": _run_child(args, "first")}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
