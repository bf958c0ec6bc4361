"""The int8 models an engine folder records (the manifest's ``"int8"`` section), and the
fidelity rule that decides whether one may run.

``apla-export --int8`` (``export/int8.py``) quantizes a network with NNCF for OpenVINO and
measures it end to end: videos sampled with the int8 network in the runtime's loop against the
same videos sampled in fp32, as the PSNR of their frames. The section keeps, per network::

    "int8": {"unet": {
        "model": "unet.int8.xml", "weights": "unet.int8.bin",   (OpenVINO IR; sha256 in "files")
        "source": "unet.onnx", "source_sha256": "<the fp32 file's sha256>",
        "fidelity": {"metric": "psnr_db_vs_fp32", "psnr_db": [per validation case],
                     "worst_db": 49.3, "ceiling_db": 60.0, "drop_db": 10.7,
                     "max_drop_db": 12.0, "passed": true},
        "calibration": {...}, "validation": {...},   (the recipe: cases, steps, sizes)
        "quantizers": 57, "versions": {"nncf": "...", "openvino": "..."}}}

An int8 model runs only where its record passed (``Int8Model.usable``);
``Manifest.open`` refuses a record that is malformed, names files without a sha256, or was
quantized from another fp32 file than the folder now holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import IntegrityError

SECTION = "int8"
# What may be quantized: the UNet family (the loop's cost) and the VAE decoder.
QUANTIZABLE = ("unet", "unet_feature", "unet_shallow", "vae_decoder")
METRIC = "psnr_db_vs_fp32"
# PSNR against the fp32 video is capped here: at 60 dB the frames differ by a quarter of a grey
# level (RMS), which an 8-bit video cannot show, and the fp32 model itself (infinite PSNR)
# scores it; the drop is measured from it.
PSNR_CEILING_DB = 60.0
# The budget: an int8 network must keep every validation video within 48 dB PSNR of the fp32
# video, i.e. move the frames less than the solver's own discretisation does (DDIM 50 lands
# 47.9 dB from a 500-step DDIM reference on a trained tiny model, issue 25), and about as
# little as bf16 does (52 dB there). Plain post-training int8 moved that video to 43.6 dB.
MAX_DROP_DB = 12.0

Resolve = Callable[[Any, str], Path]  # (relative path, what) -> a path inside the folder


def _fail(message: str) -> IntegrityError:
    return IntegrityError(f"invalid manifest: {message}; re-add it with apla-export --int8 "
                          "--engine-dir DIR --force")


def fidelity(psnrs: Iterable[float], max_drop_db: float = MAX_DROP_DB) -> dict[str, Any]:
    """The fidelity record of per-case PSNRs (dB, int8 video vs fp32 video): the worst case,
    capped at the ceiling, its drop from the ceiling and whether it is within ``max_drop_db``."""
    capped = [min(float(p), PSNR_CEILING_DB) for p in psnrs]
    if not capped:
        raise ValueError("no validation case was measured")
    worst = min(capped)
    drop = PSNR_CEILING_DB - worst
    return {"metric": METRIC, "psnr_db": [round(p, 3) for p in capped], "worst_db": round(worst, 3),
            "ceiling_db": PSNR_CEILING_DB, "drop_db": round(drop, 3), "max_drop_db": float(max_drop_db),
            "passed": bool(drop <= max_drop_db)}


@dataclass(frozen=True)
class Int8Model:
    """One network's int8 record (module docstring)."""

    network: str
    model: Path  # the OpenVINO IR graph (.xml)
    weights: Path  # its weights (.bin)
    source: Path  # the fp32 ONNX file it was quantized from
    worst_db: float
    drop_db: float
    max_drop_db: float
    passed: bool
    record: Mapping[str, Any]  # the whole entry, as written

    @property
    def files(self) -> tuple[Path, Path]:
        return self.model, self.weights

    def usable(self) -> tuple[bool, str]:
        """(True, why) where the recorded check passed within its budget (``MAX_DROP_DB``
        unless the export was given another, which the line names); else (False, one line
        saying by how much it missed)."""
        if not self.passed:
            return False, (f"its int8 check did not pass: {self.worst_db:.2f} dB PSNR vs fp32, a "
                           f"{self.drop_db:.2f} dB drop over the {self.max_drop_db:g} dB budget (missed "
                           f"by {self.drop_db - self.max_drop_db:.2f} dB)")
        return True, (f"its int8 check passed: {self.worst_db:.2f} dB PSNR vs fp32 (drop "
                      f"{self.drop_db:.2f} of {self.max_drop_db:g} dB)")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(f"{where} must be a finite number, got {value!r}")
    return float(value)


def parse_entry(name: str, entry: Any, resolve: Resolve, files: Mapping[str, str],
                source: Path | None) -> Int8Model:
    """One network's record, checked (module docstring); ``source``: the network's fp32 ONNX."""
    where = f"{SECTION}.{name}"
    if not isinstance(entry, Mapping):
        raise _fail(f"{where} must be an object")
    paths = {}
    for key in ("model", "weights", "source"):
        paths[key] = resolve(entry.get(key), f"{where}.{key}")
        rel = entry[key]
        if rel not in files:
            raise _fail(f"{where}.{key} {rel} has no sha256 in 'files'")
    if source is None or paths["source"] != source:
        raise _fail(f"{where}.source {entry['source']!r} is not the network's ONNX file")
    if entry.get("source_sha256") != files[entry["source"]]:
        raise _fail(f"{where} was quantized from another {entry['source']} than the folder holds")
    fid = entry.get("fidelity")
    if not isinstance(fid, Mapping) or fid.get("metric") != METRIC or not isinstance(fid.get("passed"), bool):
        raise _fail(f"{where}.fidelity must record the metric {METRIC!r}, the PSNRs and 'passed'")
    worst, drop = _number(fid.get("worst_db"), f"{where}.fidelity.worst_db"), _number(
        fid.get("drop_db"), f"{where}.fidelity.drop_db")
    ceiling = _number(fid.get("ceiling_db"), f"{where}.fidelity.ceiling_db")
    max_drop = _number(fid.get("max_drop_db"), f"{where}.fidelity.max_drop_db")
    if abs(ceiling - worst - drop) > 1e-2 or fid["passed"] != (drop <= max_drop):
        raise _fail(f"{where}.fidelity is inconsistent (drop {drop} from {ceiling} dB at "
                    f"{worst} dB, budget {max_drop}, passed {fid['passed']})")
    return Int8Model(name, paths["model"], paths["weights"], paths["source"], worst, drop, max_drop,
                     fid["passed"], dict(entry))


def parse_section(section: Any, resolve: Resolve, files: Mapping[str, str],
                  networks: Mapping[str, Any]) -> dict[str, Int8Model]:
    """The manifest's ``"int8"`` section (absent: {}) for the folder's ``networks``
    (``NetworkSpec`` by name: their fp32 ``onnx`` files)."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise _fail(f"'{SECTION}' must map networks to their int8 records")
    out = {}
    for name, entry in section.items():
        if name not in QUANTIZABLE or name not in networks:
            raise _fail(f"{SECTION}.{name}: only {', '.join(QUANTIZABLE)} of the folder's networks "
                        "have int8 models")
        out[name] = parse_entry(name, entry, resolve, files, networks[name].onnx)
    return out
