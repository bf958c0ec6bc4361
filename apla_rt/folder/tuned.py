"""``tuned.json`` in an engine folder: the sampling setting ``apla-rt tune`` chose for this model,
one entry per machine.

    {"format": "apla-tuned/1",
     "machines": {"<machine id>": {"machine": {...what the id hashes...},
                                   "settings": {SamplingSettings.to_dict()},
                                   "precision": "auto" | "fp32", "budget_db": 1.0, ...}}}

A machine's id hashes what the choice depended on (``apla_rt.backends.precision.machine_key``:
the CPU's model and flags, the libraries' versions, the thread count, the folder's manifest);
an entry is used only where the id matches. The file is written atomically and is not part of
the manifest's ``files``: it records a measurement of this folder on some machines, not the
model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from .atomic import write_text

TUNED_NAME = "tuned.json"
FORMAT = "apla-tuned/1"


def machine_id(machine: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(machine), sort_keys=True).encode()).hexdigest()[:16]


def read_tuned(folder: Path) -> dict[str, Any]:
    """The file's machines (id -> entry); nothing for a missing or unreadable file, which only
    means that nothing was tuned."""
    try:
        data = json.loads((folder / TUNED_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("machines"), dict):
        return {}
    return {k: v for k, v in data["machines"].items() if isinstance(v, dict)}


def is_for(entry: Mapping[str, Any], machine: Mapping[str, Any]) -> bool:
    """Whether ``entry`` was measured on ``machine`` (compared as JSON stores it)."""
    return entry.get("machine") == json.loads(json.dumps(dict(machine)))


def tuned_entry(folder: Path, machine: Mapping[str, Any]) -> dict[str, Any] | None:
    """This machine's entry, or None."""
    entry = read_tuned(folder).get(machine_id(machine))
    return entry if entry is not None and is_for(entry, machine) else None


def write_tuned(folder: Path, machine: Mapping[str, Any], entry: Mapping[str, Any]) -> Path:
    """Record ``entry`` for this machine, keeping the other machines' entries."""
    machines = read_tuned(folder)
    machines[machine_id(machine)] = {"machine": dict(machine), **entry}
    text = json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True) + "\n"
    return write_text(folder / TUNED_NAME, text, force=True)
