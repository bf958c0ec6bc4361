"""Reduced precision on the CPU: which precision a network runs in, and the check that earns it.

``--precision auto|fp32|bf16|int8`` (``Pipeline.open(..., precision=...)``):

* ``fp32``: every backend, today's arithmetic.
* ``bf16``: OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=bf16`` (``--backend
  openvino``; ``auto`` picks it). Refused in one line on a CPU without bf16 matrix units
  (neither ``amx_bf16`` nor ``avx512_bf16`` in its flags) or where OpenVINO does not report
  BF16 among the CPU's optimisation capabilities.
* ``auto``: bf16 on the OpenVINO backend where the CPU has AMX (``amx_bf16``) and the check
  passed, otherwise fp32. ``avx512_bf16`` alone is not enough for ``auto``: on such a CPU
  (Intel Xeon with avx512_bf16, no AMX) OpenVINO's bf16 UNet call took 1.1-2.2x the time of
  ONNX Runtime fp32 at SD shape, and the whole generate 1.3x (two runs, docs/cpu.md);
  ``--precision bf16`` still runs it there. Other
  backends (``--backend auto`` included) keep their fp32 path.
* ``int8``: OpenVINO runs the folder's int8 models (``apla-export --int8``: NNCF under
  accuracy control, ``apla_rt.folder.int8``) where their recorded end-to-end check passed
  (``int8_available``), the other networks in fp32. Refused in one line where the UNet has no
  such model; a cache graph or VAE decoder whose int8 check missed runs fp32 with a note.
  ``auto`` does not pick int8.

No reduced precision runs unchecked. An int8 model's check is recorded in the folder when it
is made (the frames it samples against fp32's). Before a network's first bf16 use on a machine, it is run
in bf16 and in the exact reference (ONNX Runtime fp32, same file) on seeded inputs at its
profile's opt shape (``seeded_feeds``); the worst max abs and RMS / reference RMS must be
within ``BF16_TOLERANCE`` (calibrated in docs/cpu.md). The verdict is cached per machine
(``VerdictCache``: CPU model and flags, OpenVINO version, the file's sha256, the network and
the tolerance make its key); a miss falls back to fp32 with one line saying so.

The cache folder (``cache_dir``) is ``$APLA_CACHE_DIR``, else ``$XDG_CACHE_HOME/apla``, else
``~/.cache/apla``; it also holds OpenVINO's compiled-model cache (``openvino/<sha256>/<precision>/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..folder.atomic import write_text
from ..errors import BackendUnavailable, InputError
from ..folder.manifest import Manifest, NetworkSpec

PRECISIONS = ("auto", "fp32", "bf16", "int8")
PRECISION_HELP = ("auto: bf16 on OpenVINO (--backend openvino, or auto on an AMX CPU for a large "
                  "UNet) where the CPU has AMX and the bf16 check passed, else fp32; fp32: full precision (the exact reference); bf16: "
                  "OpenVINO bf16, refused on a CPU without bf16 units; int8: OpenVINO on the folder's "
                  "int8 models whose recorded check passed (apla-export --int8), refused without "
                  "one for the UNet (docs/cpu.md).")
# A CPU flag either of which gives bf16 dot products in hardware (Linux /proc/cpuinfo names).
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512_BF16"}
CACHE_ENV = "APLA_CACHE_DIR"
CHECK_SEEDS = (0, 1)
# Worst bf16-vs-fp32 error per output (outputs of O(1)): measured on the trained tiny model and
# the SD-1.5-shaped one with benchmarks/cpu_backends.py --tolerance, margin in docs/cpu.md.
BF16_TOLERANCE = {"max_abs": 0.25, "rel_rms": 0.06}


@dataclass(frozen=True)
class CpuInfo:
    """What decides bf16 on this machine: the CPU's model name and its feature flags."""

    model: str
    flags: frozenset[str]

    def bf16_units(self) -> list[str]:
        return sorted(f for f in BF16_FLAGS if f in self.flags)


def probe_cpu() -> CpuInfo:
    """The CPU's model name and flags from /proc/cpuinfo (Linux); elsewhere no flags."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model, flags)


def check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return str(precision)


def bf16_unavailable(cpu: CpuInfo, ov_capabilities: tuple[str, ...] | None) -> str | None:
    """Why bf16 cannot run here (one line naming the missing flag), or None."""
    if not cpu.bf16_units():
        names = " or ".join(f"{f} ({what})" for f, what in BF16_FLAGS.items())
        return f"this CPU ({cpu.model}) has no bf16 matrix units: its flags lack {names}"
    if ov_capabilities is not None and "BF16" not in ov_capabilities:
        return (f"OpenVINO's CPU plugin does not report BF16 among this CPU's capabilities "
                f"({', '.join(ov_capabilities)})")
    return None


# What ``auto`` needs before it tries bf16: the matrix units (AMX). Measured on a CPU with
# avx512_bf16 and no AMX, bf16 was slower than fp32 (docs/cpu.md), so auto keeps fp32 there.
AUTO_BF16_FLAG = "amx_bf16"


def auto_picks_bf16(cpu: CpuInfo, ov_capabilities: tuple[str, ...] | None) -> bool:
    """Whether ``--precision auto`` tries bf16 (then still only if its check passes)."""
    return AUTO_BF16_FLAG in cpu.flags and bf16_unavailable(cpu, ov_capabilities) is None


# The smallest UNet (its ONNX files, in MB) for which ``--backend auto --precision auto`` runs
# OpenVINO (bf16 where checked) on an AMX CPU instead of ONNX Runtime fp32. Measured on an AMX
# Xeon, 2 threads: the SD-1.5-shaped UNet (3.4 GB) ran its guided call 2.9x faster in bf16 and
# the whole generate 3.4x; the tiny preset's (under 10 MB: matrices a few dozen wide) ran
# slower on OpenVINO in either precision (docs/cpu.md). The bound sits between the two.
AUTO_OPENVINO_MIN_UNET_MB = 100.0


def auto_openvino_may_pay(cpu: CpuInfo, unet_mb: float) -> bool:
    """The part of ``auto_openvino_reason`` that needs no OpenVINO: AMX and a UNet that large."""
    return AUTO_BF16_FLAG in cpu.flags and unet_mb >= AUTO_OPENVINO_MIN_UNET_MB


def auto_openvino_reason(cpu: CpuInfo, ov_capabilities: tuple[str, ...] | None,
                         unet_mb: float) -> str | None:
    """Why ``--backend auto --precision auto`` runs OpenVINO here, or None for ONNX Runtime."""
    if not auto_openvino_may_pay(cpu, unet_mb) or not auto_picks_bf16(cpu, ov_capabilities):
        return None
    return f"{AUTO_BF16_FLAG} on this CPU and a {unet_mb:,.0f} MB UNet: bf16 where its check passed"


def int8_available(manifest: Manifest, name: str) -> tuple[bool, str]:
    """Whether network ``name`` may run its int8 model: (True, why) where the folder has one
    whose recorded end-to-end check passed within the budget (``apla_rt.folder.int8``), else
    (False, one line saying why)."""
    model = manifest.int8.get(name)
    if model is None:
        return False, f"the engine folder has no int8 model for {name} (apla-export --int8 adds one)"
    return model.usable()


def require_bf16(cpu: CpuInfo, ov_capabilities: tuple[str, ...] | None) -> None:
    why = bf16_unavailable(cpu, ov_capabilities)
    if why is not None:
        raise BackendUnavailable(f"--precision bf16: {why}; use --precision fp32 or auto")


# --------------------------------------------------------------------------- the cache folder


def cache_dir() -> Path:
    """The user cache folder (see the module docstring); created on first use."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "apla"


def verdict_key(cpu: CpuInfo, ov_version: str, sha256: str, network: str,
                tolerance: Mapping[str, float]) -> dict[str, Any]:
    """Everything a cached bf16 verdict depends on."""
    return {"cpu_model": cpu.model, "cpu_flags": hashlib.sha256(
        " ".join(sorted(cpu.flags)).encode()).hexdigest()[:16], "openvino": ov_version,
        "sha256": sha256, "network": network, "tolerance": dict(sorted(tolerance.items()))}


class VerdictCache:
    """bf16 verdicts on disk (``bf16-checks.json`` in the cache folder), one per key."""

    def __init__(self, root: Path | None = None):
        self.path = (root or cache_dir()) / "bf16-checks.json"

    @staticmethod
    def _id(key: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # no cache yet, or an unreadable one: the check runs again
        return data if isinstance(data, dict) else {}

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        entry = self._read().get(self._id(key))
        if isinstance(entry, dict) and entry.get("key") == json.loads(json.dumps(key)):
            return entry
        return None

    def put(self, key: Mapping[str, Any], verdict: Mapping[str, Any]) -> None:
        data = self._read()
        data[self._id(key)] = {"key": dict(key), **verdict}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n", force=True)


# --------------------------------------------------------------------------- the check


def seeded_feeds(spec: NetworkSpec, seed: int, token_ids: np.ndarray | None = None,
                 timesteps: int = 1000) -> dict[str, np.ndarray]:
    """Inputs at the profile's opt shape: N(0, 1) floats, timesteps in [0, ``timesteps``),
    ``input_ids`` rows drawn from ``token_ids`` (real prompts' ids: any id of the vocabulary)."""
    rng = np.random.default_rng(seed)
    sizes = {d: r[1] for d, r in spec.profile.items()}
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.shape(sizes)
        if t.name == "input_ids":
            assert token_ids is not None, "input_ids need token ids to draw from"
            rows = rng.integers(0, token_ids.shape[0], shape[0])
            feeds[t.name] = np.ascontiguousarray(token_ids[rows, :shape[1]], dtype=t.dtype)
        elif np.issubdtype(t.dtype, np.integer):
            feeds[t.name] = np.full(shape, rng.integers(0, timesteps), dtype=t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Worst max abs and ``rel_rms`` over the outputs (NaN/Inf: infinite error).

    ``rel_rms`` is the error's RMS over max(reference RMS, 1): relative for outputs of unit
    size or more (noise predictions, hidden states, images), absolute for small ones (a VGT's
    perturbation near initialisation is O(1e-3) and is added to an O(1) noise prediction, so
    its error matters on that scale)."""
    worst = {"max_abs": 0.0, "rel_rms": 0.0}
    for name, r in ref.items():
        r64, g64 = r.astype(np.float64), got[name].astype(np.float64)
        if not np.isfinite(g64).all():
            return {"max_abs": float("inf"), "rel_rms": float("inf")}
        diff = g64 - r64
        rms_ref = max(float(np.sqrt(np.mean(r64 ** 2))), 1.0)
        worst["max_abs"] = max(worst["max_abs"], float(np.abs(diff).max(initial=0.0)))
        worst["rel_rms"] = max(worst["rel_rms"], float(np.sqrt(np.mean(diff ** 2))) / rms_ref)
    return worst


Run = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def run_check(reference: Run, candidate: Run, feeds_list: list[dict[str, np.ndarray]],
              tolerance: Mapping[str, float]) -> dict[str, Any]:
    """``candidate`` (bf16) against ``reference`` (fp32) on every feed set: the worst errors
    and whether they are within ``tolerance``."""
    worst = {"max_abs": 0.0, "rel_rms": 0.0}
    for feeds in feeds_list:
        errs = compare_outputs(reference(feeds), candidate(feeds))
        worst = {k: max(worst[k], errs[k]) for k in worst}
    passed = all(worst[k] <= tolerance[k] for k in tolerance)
    return {"passed": passed, "worst": {k: float(f"{v:.4g}") for k, v in worst.items()},
            "tolerance": dict(tolerance), "checks": len(feeds_list)}


def miss_line(network: str, verdict: Mapping[str, Any]) -> str:
    """The one line a failed check prints: which network falls back and by how much it missed."""
    worst, tol = verdict.get("worst", {}), verdict.get("tolerance", {})
    detail = ", ".join(f"{k} {worst.get(k)} (tolerance {tol.get(k)})" for k in tol)
    return f"bf16 check failed for {network} ({detail}): it runs in fp32"
