"""The run folder (``--out``): checking a new run's inputs, creating or reopening the folder,
and its JSON files.

Layout::

    config.json        the full config
    base/              tiny preset only: the frozen components (diffusers format)
    checkpoints/       see checkpoint.py; resumed with --resume
    metrics.jsonl      one JSON line per step: every loss term, ratio ||delta||/||eps_theta||
    start_latent.npy   DDIM inversion of the training clip (empty prompt, the trained predictor)
    source_latent.npy  vgt.source runs only: the clip's clean latent, which that VGT reads
    sample.mp4/.gif    the training prompt sampled from start_latent (reference sampler)
    summary.json       losses at start/end, PSNR of the reconstruction, the steps after
                       training, timings
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from apla_rt.folder import atomic
from apla_rt.errors import AplaError, ConfigError, InputError, OutputExistsError
from apla_rt.media.video import read_video

from . import checkpoint as ckpt
from .components import SUBFOLDERS, byte_level_clip_tokenizer, load_pretrained, tokenize
from .config import AplaConfig, from_dict
from .losses import default_lpips_weights, load_lpips


def read_clip(cfg: AplaConfig) -> np.ndarray:
    """The training frames: uint8 (f, h, w, 3) as ``cfg.data`` samples them from the clip."""
    return read_video(cfg.video, start=cfg.data.start, stride=cfg.data.stride,
                      n_frames=cfg.data.n_frames, size=cfg.data.size)


def check_inputs(cfg: AplaConfig) -> np.ndarray:
    """What a new run can check before its folder is touched (numbers, clip, prompt), so that
    bad input neither leaves a half-made run nor removes an old one under --force."""
    _check_numbers(cfg)
    frames = read_clip(cfg)
    if cfg.model.preset == "tiny":
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            tokenize(byte_level_clip_tokenizer(Path(tmp)), [cfg.prompt])
    else:
        _check_pretrained_prompt(cfg)
    if cfg.loss.l_per > 0:
        weights = cfg.loss.lpips_weights or default_lpips_weights(cfg.loss.lpips_net)
        if not Path(weights).is_file():
            load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights)  # raises its one-line explanation
    return frames


def _check_numbers(cfg: AplaConfig) -> None:
    def walk(data: dict, prefix: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{prefix}{key} must be a finite number (got {value})")
    walk(cfg.to_dict(), "")
    if not -2**62 <= cfg.train.seed <= 2**62:
        raise ConfigError(f"train.seed must be between -2**62 and 2**62 (got {cfg.train.seed})")
    down = cfg.model.tiny_patch if cfg.model.preset == "tiny" else _vae_downsample(cfg.model.pretrained)
    if cfg.data.size % down or (cfg.vgt.kind != "none" and (cfg.data.size // down) % cfg.vgt.patch):
        raise ConfigError(f"data.size {cfg.data.size} must be a multiple of {down} (the autoencoder's "
                          f"downsampling) times vgt.patch {cfg.vgt.patch}")


def _check_pretrained_prompt(cfg: AplaConfig) -> None:
    """The --pretrained folder is complete and its tokenizer takes the prompt."""
    from transformers import CLIPTokenizer

    from .hub import resolve_pretrained

    root = resolve_pretrained(cfg.model.pretrained, cfg.model.variant)  # a Hub id -> its snapshot
    if not root.is_dir() or not all((root / s).is_dir() for s in SUBFOLDERS):
        load_pretrained(root)  # raises its error naming what is missing
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        n_tokens = len(tokenizer(cfg.prompt, verbose=False).input_ids)
    except Exception as err:  # noqa: BLE001 - any failure here is the user's folder
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"cannot load --pretrained {root}/tokenizer: {reason}") from err
    if n_tokens > tokenizer.model_max_length:
        tokenize(tokenizer, [cfg.prompt])  # raises its "prompt is too long" error


def _vae_downsample(pretrained: str | None) -> int:
    """Pixels per latent cell of a --pretrained folder's autoencoder (8 for SD 1.x's VAE)."""
    try:
        vae = json.loads((Path(pretrained) / "vae" / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return 8  # a missing or broken folder is reported by the checks that follow
    if vae.get("_class_name") == "PatchPCAAutoencoder":
        return int(vae.get("patch", 8))
    blocks = vae.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8


def prepare_run(cfg: AplaConfig, run: Path, resume: bool, force: bool,
                steps: int | None = None) -> AplaConfig:
    """Create or reopen the run folder; with --resume the saved config is authoritative,
    except ``steps``, which may extend (never shorten below the last checkpoint) the run."""
    saved = run / "config.json"
    if resume:
        return _reopen(run, steps)
    if run.exists() and not run.is_dir():
        raise InputError(f"--out {run} is a file, not a run folder; choose another --out")
    if run.exists() and any(run.iterdir()):
        if not force:
            raise OutputExistsError(f"{run} already exists and is not empty; pass --resume to continue "
                                    f"it or --force to start over")
        shutil.rmtree(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the run folder {run}: {err.strerror or err}") from err
    write_json(saved, cfg.to_dict())
    return cfg


def _reopen(run: Path, steps: int | None) -> AplaConfig:
    saved = run / "config.json"
    if not saved.is_file():
        raise InputError(f"--resume: {run} is not a run folder (no config.json)")
    try:
        data = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--resume: {saved} is unreadable ({err}); start over with --force") from err
    resumed = from_dict(data).validate()
    if steps is not None and steps != resumed.train.steps:
        last = ckpt.latest_checkpoint(run)
        done = int(ckpt.read_state(last)["step"]) if last is not None else 0
        if steps < done:
            raise InputError(f"--steps {steps} is below the {done} steps this run has already done")
        resumed.train.steps = steps
        write_json(saved, resumed.to_dict())
    return resumed


def write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n", force=True)


def read_metrics(path: Path) -> list[dict]:
    """The metric records; a line torn by a killed run (or a full disk) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    keep = [json.dumps(r) for r in read_metrics(path) if r["step"] <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep), force=True)


class MetricsLog:
    """``metrics.jsonl`` opened for appending: one flushed JSON line per step."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            raise AplaError(f"could not write {self.path}: {err.strerror or err}") from err

    def close(self) -> None:
        self._file.close()


def loss_summary(path: Path) -> dict:
    """From ``metrics.jsonl`` (resumed runs included): the mean loss of the first and last 10
    steps and how many steps were skipped as non-finite."""
    records = read_metrics(path)
    history = [r["loss"] for r in records if "loss" in r]
    return {"skipped_nonfinite": sum(1 for r in records if "skipped" in r),
            "loss_first10": _mean(history[:10]), "loss_last10": _mean(history[-10:])}


def _mean(xs: list[float]) -> float | None:
    return round(float(np.mean(xs)), 6) if xs else None
