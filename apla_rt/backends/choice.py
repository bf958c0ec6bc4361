"""``--backend auto --precision auto`` on a CPU: each network runs where it runs fastest among
the candidates that stay faithful, as measured on this machine, and the measurement is cached.

The candidates for a network, in order: ONNX Runtime fp32 (the exact reference), OpenVINO fp32,
OpenVINO bf16 where the CPU has bf16 dot products and OpenVINO reports BF16 for it, and
OpenVINO int8 where the engine folder holds an int8 model whose recorded check passed. What the
CPU's flags say only decides what is worth timing, never what is chosen.

Each candidate is opened and run on the check's seeded inputs at the profile's opt shape: once
to warm up, then until ``MIN_CALLS`` calls and ``MIN_SECONDS`` have passed, or ``MAX_SECONDS``;
its time is the median call. Its fidelity is its outputs against ONNX Runtime fp32's on the
same inputs, within the tolerance of its precision (``tolerance``; bf16's is the bf16 check's);
an int8 model's fidelity is the end-to-end check the export recorded. The fastest candidate that passes is chosen; ONNX Runtime fp32 always passes.

The table is cached per machine (``cpu-choices.json`` in the user cache folder), keyed by the
CPU's model and flags, ONNX Runtime's and OpenVINO's versions, the network's file, the threads
and the tolerances: a new machine, library, model or thread count measures again.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import AplaError
from ..folder.manifest import Manifest
from . import precision as cpu_precision
from .compare import run_check, seeded_feeds
from .precision import CHECK_SEEDS, CpuInfo, VerdictCache
from .runners import open_runner

MIN_CALLS, MIN_SECONDS, MAX_SECONDS = 3, 0.25, 5.0
# Another backend in fp32 computes the same arithmetic in another order: its outputs differ from
# ONNX Runtime's by float32 rounding only (OpenVINO fp32 vs ONNX Runtime: 9e-6 on the SD-shaped
# final latent, docs/benchmarks.md); the bound catches a backend that computes something else.
FP32_TOLERANCE = {"max_abs": 1e-2, "rel_rms": 1e-3}
CACHE_FILE = "cpu-choices.json"


def tolerance(precision: str) -> Mapping[str, float]:
    """What a candidate in ``precision`` must stay within (bf16's is the bf16 check's)."""
    return FP32_TOLERANCE if precision == "fp32" else cpu_precision.BF16_TOLERANCE


def candidates(manifest: Manifest, name: str, cpu: CpuInfo) -> list[tuple[str, str]]:
    """(backend, precision) worth timing for network ``name`` on this machine."""
    out = [("ort", "fp32")]
    from .openvino import openvino_status

    if not openvino_status()[0] or manifest.network(name).onnx is None:
        return out
    from .openvino import ov_capabilities

    out.append(("openvino", "fp32"))
    if cpu_precision.bf16_unavailable(cpu, ov_capabilities()) is None:
        out.append(("openvino", "bf16"))
    if cpu_precision.int8_available(manifest, name)[0]:
        out.append(("openvino", "int8"))
    return out


def _versions() -> dict[str, str]:
    import onnxruntime

    from .openvino import openvino_status, ov_version

    return {"onnxruntime": onnxruntime.__version__,
            "openvino": ov_version() if openvino_status()[0] else "absent"}


def table_key(manifest: Manifest, name: str, cpu: CpuInfo, threads: int | None) -> dict[str, Any]:
    """Everything a network's measured table depends on."""
    spec = manifest.network(name)
    files = {manifest.rel(p): manifest.files.get(manifest.rel(p))
             for p in (spec.onnx, spec.onnx_ort) if p is not None}
    bounds = {f"{p}.{k}": v for p in ("fp32", "bf16") for k, v in tolerance(p).items()}
    base = cpu_precision.verdict_key(cpu, _versions()["openvino"], "", name, bounds)
    return {**base, "sha256": files, "onnxruntime": _versions()["onnxruntime"], "threads": threads}


def measured(manifest: Manifest, name: str, threads: int | None, cpu: CpuInfo,
             run: bool = True) -> dict[str, Any] | None:
    """The network's table (``measure``): cached, else (``run``) measured now and cached, else
    None."""
    cache = VerdictCache(file=CACHE_FILE)
    key = table_key(manifest, name, cpu, threads)
    table = cache.get(key)
    if table is None and run:
        table = measure(manifest, name, threads, cpu)
        cache.put(key, table)
    return table


def measure(manifest: Manifest, name: str, threads: int | None, cpu: CpuInfo) -> dict[str, Any]:
    """Time and check every candidate of network ``name`` (module docstring):
    ``{"rows": [{backend, precision, seconds, passed, fidelity}...], "chosen": [backend, precision]}``."""
    spec = manifest.network(name)
    token_ids = _token_ids(manifest) if "input_ids" in spec.input_names else None
    timesteps = int(manifest.scheduler.num_train_timesteps)
    feeds = [seeded_feeds(spec, s, token_ids, timesteps) for s in CHECK_SEEDS]
    rows: list[dict[str, Any]] = []
    reference = open_runner(manifest, name, "ort", threads)
    try:
        expected = [reference.run(f) for f in feeds]
        for backend, precision in candidates(manifest, name, cpu):
            rows.append(_row(manifest, name, backend, precision, threads, feeds, expected))
    finally:
        reference.close()
    passing = [r for r in rows if r["passed"]]
    best = min(passing, key=lambda r: r["seconds"])
    return {"rows": rows, "chosen": [best["backend"], best["precision"]]}


def _row(manifest: Manifest, name: str, backend: str, precision: str, threads: int | None,
         feeds: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """One candidate's time and fidelity; a candidate that cannot open or run is a failed row."""
    row: dict[str, Any] = {"backend": backend, "precision": precision}
    try:
        runner = open_runner(manifest, name, backend, threads, precision=precision)
    except AplaError as err:
        return {**row, "seconds": None, "passed": False, "fidelity": f"cannot open: {err}"}
    try:
        row["seconds"] = _median_call(lambda: runner.run(feeds[0]))
        if precision == "int8":
            ok, why = cpu_precision.int8_available(manifest, name)
            row.update(passed=ok, fidelity=why)
        else:
            answers = iter(expected)
            verdict = run_check(lambda f: next(answers), runner.run, feeds, tolerance(precision))
            row.update(passed=verdict["passed"], fidelity=verdict["worst"])
    finally:
        runner.close()
    return row


def _median_call(call: Callable[[], Any]) -> float:
    """Seconds of one call: warmed up once, then the median of at least ``MIN_CALLS`` calls and
    ``MIN_SECONDS``, at most ``MAX_SECONDS``."""
    call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < MIN_CALLS or time.perf_counter() - started < MIN_SECONDS:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > MAX_SECONDS:
            break
    return float(statistics.median(times))


def _token_ids(manifest: Manifest) -> np.ndarray:
    from .openvino import prompt_token_ids

    return prompt_token_ids(manifest)


def describe(table: Mapping[str, Any]) -> str:
    """Why the chosen candidate runs: its time against the reference's."""
    rows = {(r["backend"], r["precision"]): r for r in table["rows"]}
    chosen = rows[tuple(table["chosen"])]
    reference = rows[("ort", "fp32")]
    if chosen is reference:
        return f"measured fastest here ({reference['seconds']:.3g} s a call)"
    return (f"measured fastest faithful here ({chosen['seconds']:.3g} s a call, ONNX Runtime fp32 "
            f"{reference['seconds']:.3g} s)")


def machine_key(manifest: Manifest, threads: int | None) -> dict[str, Any]:
    """What a measurement of this folder on this machine depends on (``tuned.json``'s key):
    the CPU's model and flags, the libraries' versions, the threads, the folder's manifest."""
    import hashlib

    cpu = cpu_precision.probe_cpu()
    manifest_sha = hashlib.sha256((manifest.root / "manifest.json").read_bytes()).hexdigest()
    flags = hashlib.sha256(" ".join(sorted(cpu.flags)).encode()).hexdigest()[:16]
    return {"cpu_model": cpu.model, "cpu_flags": flags, "threads": threads, **_versions(),
            "manifest": manifest_sha}
