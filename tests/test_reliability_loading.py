"""Reliability, safe loading (docs/reliability.md section 4): no pickle anywhere in the product
code, and a trained run and an engine folder hold only safetensors, JSON, .npy without object
arrays, ONNX, text and video files. (The runtime's refusals of tampered artifacts, paths
leaving the engine folder and unknown manifest versions are rows of the bad-input table.)"""

from __future__ import annotations

import re

import numpy as np
from reliability_helpers import REPO


PRODUCT = ("apla_train", "apla_rt", "export", "apla_eval", "apla_ui", "benchmarks", "tools")


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call in ``text`` (parentheses balanced)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def test_no_pickle_anywhere_in_the_product_code():
    files = [p for d in PRODUCT for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        if re.search(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|joblib|shelve|marshal)\b", text, re.M):
            problems.append(f"{rel}: imports a pickle-based module")
        if re.search(r"allow_pickle\s*=\s*True", text):
            problems.append(f"{rel}: allow_pickle=True")
        if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", text):
            problems.append(f"{rel}: yaml loading that can build objects (use yaml.safe_load)")
        for args in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                problems.append(f"{rel}: torch.load({args.strip()}) without weights_only=True")
    assert not problems, "\n".join(problems)


def test_checkpoints_and_engine_folders_hold_no_pickle(ref_run, engine):
    """Weights are safetensors, latents .npy (no object arrays), metadata JSON."""
    allowed = {".safetensors", ".json", ".npy", ".onnx", ".jsonl", ".mp4", ".gif", ".txt", ".plan", ".data"}
    for root in (ref_run, engine):
        for path in root.rglob("*"):
            if path.is_file():
                assert path.suffix in allowed, path
                if path.suffix == ".npy":
                    assert np.load(path, allow_pickle=False).dtype != object
