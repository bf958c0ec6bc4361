"""Peak RSS of ``apla-export`` per phase, and its ratio to the UNet's fp32 weight bytes.

    python benchmarks/export_memory.py --run RUN [--out DIR] [--threads 2] [--json OUT.json]
        [--export-arg=--no-cache-graphs ...]

The export runs in a child process (``export.pipeline.export_run`` with the CLI's defaults;
``--export-arg`` passes ``apla-export`` options through), so that the peak starts from a
bare interpreter; this parent imports neither torch nor ONNX Runtime.

Phases: the child wraps the pipeline's stages (loading the run, each ``torch.onnx.export``,
the graph clean-up, the external-data save, the PyTorch reference outputs, each ONNX
Runtime validation session) and at every stage boundary reads the process's high-water
mark (``VmHWM`` in ``/proc/self/status``) and resets it (``/proc/self/clear_refs``, "5").
Each boundary's reading is the peak since the previous one, so a stage's peak is the
largest reading taken while it was open, and the process peak is the largest of them all:
exact, not sampled. (The reset also resets what ``ru_maxrss`` would report, which is why
the child computes its peak itself; ``--no-phases`` skips the wrapping and reports the
child's ``ru_maxrss`` instead, as ``benchmarks/sd_scale.py`` does.)

The UNet's fp32 weight bytes are the initializer bytes of the written ``unet.onnx`` (the
portable graph; read without its weights), as in ``benchmarks/sd_scale.py``. Target
(issue 25): peak <= 2.0x those bytes at SD-1.5 shape, with the DeepCache graphs and the
fused-attention flavours written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
GIB = 1024 ** 3
TARGET_RATIO = 2.0


# --------------------------------------------------------------------------- child


class PhaseMeter:
    """Exact per-phase peak RSS from the kernel's high-water mark, reset at every boundary."""

    def __init__(self) -> None:
        self.open: list[str] = []
        self.peaks: dict[str, int] = {}  # phase label -> peak bytes
        self.timeline: list[dict] = []  # one row per closed phase, in order
        self.peak = 0
        self._entered = 0
        self._t0 = time.perf_counter()

    @staticmethod
    def _status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024

    def checkpoint(self) -> int:
        """The peak since the last checkpoint, credited to every open phase; then reset."""
        hwm = self._status("VmHWM")
        self.peak = max(self.peak, hwm)
        for label in self.open or ["(between phases)"]:
            self.peaks[label] = max(self.peaks.get(label, 0), hwm)
        Path("/proc/self/clear_refs").write_text("5")
        return hwm

    @contextlib.contextmanager
    def phase(self, label: str):
        self.checkpoint()
        base = self._status("VmRSS")
        started = time.perf_counter()
        self._entered += 1
        order = self._entered
        self.open.append(label)
        try:
            yield
        finally:
            self.checkpoint()
            self.open.pop()
            end = self._status("VmRSS")
            self.timeline.append({"phase": label, "order": order, "depth": len(self.open),
                                  "start_s": round(started - self._t0, 2),
                                  "seconds": round(time.perf_counter() - started, 2),
                                  "rss_before_gib": round(base / GIB, 3),
                                  "rss_after_gib": round(end / GIB, 3),
                                  "peak_gib": round(self.peaks[label] / GIB, 3)})


def _wrap(meter: PhaseMeter, owner, attr: str, label) -> None:
    """Replace ``owner.attr`` with a version timed as a phase; ``label(*args, **kw)`` names it."""
    real = getattr(owner, attr)

    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        with meter.phase(label(*args, **kwargs)):
            return real(*args, **kwargs)

    setattr(owner, attr, wrapped)


def instrument(meter: PhaseMeter) -> None:
    """Wrap the export's stages (module attributes, looked up at call time) as phases."""
    import torch

    from export import onnx_export, pipeline

    current = {"graph": "?"}

    def export_label(spec, sizes, path, *a, **k):
        current["graph"] = Path(path).name
        return f"export {Path(path).name}"

    _wrap(meter, pipeline, "load_run", lambda *a, **k: "load run (config, pretrained, checkpoint)")
    _wrap(meter, pipeline, "export_onnx", export_label)
    _wrap(meter, torch.onnx, "export", lambda *a, **k: f"  torch.onnx.export {current['graph']}")
    _wrap(meter, onnx_export, "clean_graph", lambda *a, **k: f"  clean_graph {current['graph']}")
    _wrap(meter, onnx_export, "save_onnx", lambda *a, **k: f"  save_onnx {current['graph']}")
    _wrap(meter, pipeline, "reference_outputs",
          lambda spec, shapes=None: f"PyTorch reference outputs {spec.name}"
          + (" (small shapes)" if shapes else ""))
    _wrap(meter, pipeline, "compare_network",
          lambda spec, path, *a, **k: f"ORT validation {Path(path).name}")
    _wrap(meter, pipeline, "sha256_file", lambda path: "sha256 of the files (manifest)")


def child(args: argparse.Namespace) -> int:
    from export.cli import main as cli_main

    meter = PhaseMeter() if not args.no_phases else None
    if meter is not None:
        meter.checkpoint()
        instrument(meter)
    cmd = ["--run", str(args.run), "--out", str(args.out), "--force"] + list(args.export_arg)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    started = time.perf_counter()
    try:
        cli_main(cmd, standalone_mode=False)
    except SystemExit as err:
        if err.code:
            raise
    result = {"wall_s": round(time.perf_counter() - started, 1)}
    if meter is not None:
        meter.checkpoint()
        result.update(peak_bytes=meter.peak, phases=meter.timeline,
                      between_phases_peak_gib=round(meter.peaks.get("(between phases)", 0) / GIB, 3))
    Path(args.result).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- parent


def unet_weight_bytes(engine: Path) -> int:
    """Initializer bytes of the portable ``unet.onnx`` (external lengths; nothing loaded)."""
    from benchmarks.sd_scale import onnx_weight_bytes

    manifest = json.loads((engine / "manifest.json").read_text())
    return onnx_weight_bytes(engine / manifest["networks"]["unet"]["onnx"])


def merge_repeats(rows: list[dict]) -> list[dict]:
    """Consecutive rows of one label (the manifest's sha256 of each file) as one row."""
    out: list[dict] = []
    for row in rows:
        last = out[-1] if out else None
        if last is not None and last["phase"] == row["phase"] and last["depth"] == row["depth"]:
            last.update(seconds=round(last["seconds"] + row["seconds"], 2), rss_after_gib=row["rss_after_gib"],
                        peak_gib=max(last["peak_gib"], row["peak_gib"]))
        else:
            out.append(dict(row))
    return out


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))]
    return {"model": fields.get("Model name", "").strip(), "cpus": fields.get("CPU(s)", "").strip(),
            "flags": " ".join(keep)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="trained run folder")
    p.add_argument("--out", type=Path, help="engine folder to write (replaced; default RUN/../export_memory_engine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                   help="an apla-export option passed through (repeatable), e.g. --export-arg=--no-cache-graphs")
    p.add_argument("--no-phases", action="store_true",
                   help="no per-phase readings: the peak is the child's ru_maxrss")
    p.add_argument("--json", type=Path, help="write the report here too")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    run = args.run.resolve()
    if not (run / "config.json").is_file():
        print(f"--run {run} is not a training run folder (no config.json)", file=sys.stderr)
        return 1
    out = (args.out or run.parent / "export_memory_engine").resolve()
    result_path = out.parent / f".{out.name}.export_memory.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--run", str(run), "--out", str(out),
           "--threads", str(args.threads), "--result", str(result_path)]
    cmd += [f"--export-arg={a}" for a in args.export_arg] + (["--no-phases"] if args.no_phases else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"the export failed (exit {code})", file=sys.stderr)
        return 1
    result = json.loads(result_path.read_text())
    result_path.unlink()
    peak = result.get("peak_bytes") or usage.ru_maxrss * 1024
    weights = unet_weight_bytes(out)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "lscpu": lscpu(), "platform": platform.platform(), "threads": args.threads,
        "export_args": args.export_arg, "run": run.name,
        "wall_s": result["wall_s"],
        "peak_rss_gib": round(peak / GIB, 3),
        "peak_source": "ru_maxrss" if args.no_phases else "VmHWM readings at every phase boundary",
        "unet_fp32_weight_bytes": weights,
        "peak_over_unet_weights": round(peak / weights, 3),
        "target": TARGET_RATIO,
        "met": peak / weights <= TARGET_RATIO,
    }
    try:
        report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                          capture_output=True).stdout.strip() or None
    except OSError:
        report["commit"] = None
    if "phases" in result:
        report["phases"] = result["phases"]
        report["between_phases_peak_gib"] = result["between_phases_peak_gib"]
        print(f"{'phase':58s} {'start s':>8s} {'secs':>7s} {'RSS in':>7s} {'RSS out':>7s} {'peak GiB':>8s}")
        rows = merge_repeats(sorted(result["phases"], key=lambda r: r["order"]))
        for row in rows:
            print(f"{row['phase'][:58]:58s} {row['start_s']:8.1f} {row['seconds']:7.1f} "
                  f"{row['rss_before_gib']:7.2f} {row['rss_after_gib']:7.2f} {row['peak_gib']:8.2f}")
        print(f"(between phases: peak {result['between_phases_peak_gib']:.2f} GiB)")
    print(f"export peak RSS {peak / GIB:.2f} GiB; UNet fp32 weights {weights / GIB:.2f} GiB "
          f"({weights:,} bytes); ratio {peak / weights:.2f}x (target <= {TARGET_RATIO}x: "
          f"{'met' if report['met'] else 'NOT met'}); wall {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
