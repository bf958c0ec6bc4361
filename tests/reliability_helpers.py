"""Helpers for the reliability tests (tests/test_reliability_*.py): the example clip and the
reference run's options, the three CLIs as console scripts or click commands, folder
snapshots, the one-``error:``-line check, the bad-input ``World``, copying a run, reading a
checkpoint's tensors and a tiny training config.

The session's reference run, engine folder and world are fixtures in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from apla_train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "examples" / "man-skiing.mp4"  # 48 frames, 128x128, in the repository
STEPS = 12
RUN_ARGS = ["--prompt", "a man is skiing", "--model", "tiny", "--frames", "4", "--size", "32",
            "--steps", str(STEPS), "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2",
            "--set", "loss.adv_start=3", "--set", "sample.steps=2", "--set", "sample.inversion_steps=2",
            "--quiet", "--threads", "1"]
MODULES = {"apla-train": "apla_train.cli", "apla-export": "export.cli", "apla-rt": "apla_rt.cli"}


def cli_command(name: str) -> list[str]:
    """The installed console script next to this Python, else ``python -m`` its module."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", MODULES[name]]


def cli_main(name: str):
    if name == "apla-train":
        from apla_train.cli import main
    elif name == "apla-export":
        from export.cli import main
    else:
        from apla_rt.cli import main
    return main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_HASHES: dict[tuple, str] = {}


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under ``root`` -> sha256 (files) or None (folders); lock files aside.

    A file whose (inode, size, mtime, ctime) is unchanged keeps its earlier hash: any write,
    rename or replacement changes one of them, so nothing is missed and nothing rehashed.
    """
    out: dict[str, str | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.endswith(".lock"):
            continue
        if path.is_symlink() or not path.is_file():
            out[rel] = None if not path.is_symlink() else f"-> {os.readlink(path)}"
            continue
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _HASHES:
            _HASHES[key] = sha256(path)
        out[rel] = _HASHES[key]
    return out


def error_lines(text: str, prefix: str = "error:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def assert_clean_failure(result, fragment: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line containing ``fragment``."""
    if result.exc_info and not isinstance(result.exception, SystemExit):
        raise AssertionError("traceback:\n" + "".join(traceback.format_exception(*result.exc_info)))
    assert "Traceback" not in result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert result.exit_code == code, (result.exit_code, result.stderr)
    return lines[0]


@dataclass
class World:
    """A folder of existing outputs and bad inputs; no case may change anything in it."""

    root: Path

    def fmt(self, arg: str) -> str:
        return arg.format(w=self.root, clip=CLIP, run=self.root / "run", engine=self.root / "engine",
                          long="ski " * 300)


def _copy_run(src: Path, dst: Path) -> Path:
    """config.json, base/ and the latest checkpoint of a run (what loading needs)."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    shutil.copytree(src / "base", dst / "base")
    last = ckpt.latest_checkpoint(src)
    shutil.copytree(last, dst / "checkpoints" / last.name)
    return dst / "checkpoints" / last.name


def _edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def _checkpoint_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(path / name)) for name in
            ("model.safetensors", "disc.safetensors", "optim.safetensors", "rng.safetensors")}


def tiny_config(**train):
    from apla_train.config import from_dict, merge, tiny_preset

    data = merge(tiny_preset(), {
        "video": str(CLIP), "prompt": "a man is skiing", "data": {"n_frames": 4, "size": 32},
        "train": {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, **train},
        "loss": {"adv_start": 1}, "sample": {"steps": 1, "inversion_steps": 1}})
    return from_dict(data).validate()


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}
