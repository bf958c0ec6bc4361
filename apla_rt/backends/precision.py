"""Reduced precision on the CPU: which precision a network runs in, and the check that earns it.

``--precision auto|fp32|bf16|int8`` (``Pipeline.open(..., precision=...)``):

* ``fp32``: every backend, today's arithmetic.
* ``bf16``: OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=bf16`` (``--backend
  openvino``, which ``--precision bf16`` implies). Refused in one line on a CPU without bf16
  dot products (neither ``amx_bf16`` nor ``avx512_bf16`` in its flags) or where OpenVINO does
  not report BF16 among the CPU's optimisation capabilities.
* ``auto``: what measures fastest among the faithful candidates on this machine
  (``apla_rt.backends.choice``), with ``--backend auto`` or ``openvino`` on a CPU; bf16 is a
  candidate where the CPU has bf16 dot products, and is chosen only where it is measured
  faster (on a Xeon with avx512_bf16 and no AMX, OpenVINO's bf16 UNet call took 1.1-2.2x the
  time of ONNX Runtime fp32 at SD shape: docs/cpu.md). Other backends keep their files'
  precision.
* ``int8``: OpenVINO runs the folder's int8 models (``apla-export --int8``: NNCF under
  accuracy control, ``apla_rt.folder.int8``) where their recorded end-to-end check passed
  (``int8_available``), the other networks in fp32. Refused in one line where the UNet has no
  such model; a cache graph or VAE decoder whose int8 check missed runs fp32 with a note.
  Under ``auto`` a passed int8 model is one of the measured candidates.

No reduced precision runs unchecked. An int8 model's check is recorded in the folder when it
is made (the frames it samples against fp32's). Before a network's first bf16 use on a machine, it is run
in bf16 and in the exact reference (ONNX Runtime fp32, same file) on seeded inputs at its
profile's opt shape (``compare.seeded_feeds``); the worst max abs and ``rel_rms``
(``apla_rt.backends.compare``) must be within ``BF16_TOLERANCE`` (calibrated in docs/cpu.md).
The verdict is cached per machine (``VerdictCache``: CPU model and flags, OpenVINO version, the
file's sha256, the network and the tolerance make its key); a miss falls back to fp32 with one
line saying so.

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
from typing import Any, Mapping

from ..folder.atomic import write_text
from ..errors import BackendUnavailable, InputError
from ..folder.manifest import Manifest

PRECISIONS = ("auto", "fp32", "bf16", "int8")
PRECISION_HELP = ("auto: on a CPU, each network in what measured fastest among the candidates that "
                  "stay faithful on this machine (ONNX Runtime fp32, OpenVINO fp32, bf16, int8; "
                  "measured once, cached; apla-rt info shows it); fp32: full precision (the exact "
                  "reference); bf16: OpenVINO bf16, checked, refused on a CPU without bf16 units; "
                  "int8: OpenVINO on the folder's int8 models whose recorded check passed "
                  "(apla-export --int8), refused without one for the UNet (docs/cpu.md).")
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
    """Verdicts on disk, one per key: bf16 checks (``bf16-checks.json`` in the cache folder) or
    another file of measurements (``apla_rt.backends.choice``)."""

    def __init__(self, root: Path | None = None, file: str = "bf16-checks.json"):
        self.path = (root or cache_dir()) / file

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


# --------------------------------------------------------------------------- the verdict


def miss_line(network: str, verdict: Mapping[str, Any]) -> str:
    """The one line a failed check prints: which network falls back and by how much it missed."""
    worst, tol = verdict.get("worst", {}), verdict.get("tolerance", {})
    detail = ", ".join(f"{k} {worst.get(k)} (tolerance {tol.get(k)})" for k in tol)
    return f"bf16 check failed for {network} ({detail}): it runs in fp32"
