"""Checkpoints: safetensors + JSON only, complete or invisible.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` in the run folder:

| file | content |
|---|---|
| `model.safetensors` | `unet.<name>` for every *trainable* UNet parameter, `vgt.<name>` for the whole VGT |
| `disc.safetensors` | the discriminator (absent when the adversarial term is off) |
| `optim.safetensors` + `optim.json` | optimiser tensors / the rest of each optimiser's state_dict |
| `rng.safetensors` | torch's global CPU RNG and the training data generator's state (`torch_cpu`, `data`); with several processes (`accelerate launch`, `torchrun`) also every other process's (`torch_cpu.rank1`, `data.rank1`, ...) |
| `state.json` | `{"step": N, "format": 1, "processes": P, "config": {...}}` (+ `loss_scaler` with fp16) |

It is written into a hidden ``.partial`` sibling, every file fsynced, then renamed into
place, so a killed run never leaves a half checkpoint where ``latest`` would find it. The
frozen weights are not copied: they come from the run's ``base/`` folder (tiny preset) or
the ``--pretrained`` folder recorded in the config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_file, save_file

from apla_rt.errors import AplaError, InputError, IntegrityError

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def _flatten_optimizer(opt_state: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    meta: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, state in opt_state["state"].items():
        entry = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"{prefix}.{idx}.{key}"}
            else:
                entry[key] = value
        meta["state"][str(idx)] = entry
    return meta


def _unflatten_optimizer(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_file(path: str) -> dict[str, torch.Tensor]:
    """safetensors' ``load_file``; a missing, truncated or foreign file is an ``IntegrityError``."""
    try:
        return _load_file(path)
    except (OSError, SafetensorError) as err:
        raise IntegrityError(f"checkpoint file {path} is missing or damaged ({err}); delete "
                             f"{Path(path).parent} to fall back to an earlier checkpoint, or retrain") from err


def remove_partials(run: Path) -> None:
    """Remove ``.step-*.partial`` folders left by a run killed while saving."""
    root = run / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run: Path, step: int, **kwargs: Any) -> Path:
    """Write ``checkpoints/step-N`` (see ``_write_checkpoint``); a failed write (full disk)
    is an ``AplaError`` and leaves the earlier checkpoints as they were."""
    remove_partials(run)
    tmp = checkpoint_dir(run, step).with_name(f".{checkpoint_dir(run, step).name}.partial")
    try:
        return _write_checkpoint(run, step, **kwargs)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(err, "strerror", None) or str(err)
        last = latest_checkpoint(run)
        kept = f"the last complete checkpoint {last.name} is kept" if last else "no checkpoint was kept"
        raise AplaError(f"could not write checkpoint step-{step:08d}: {reason}; {kept}") from err


def _write_checkpoint(run: Path, step: int, *, unet_trainable: dict[str, torch.Tensor],
                      vgt: torch.nn.Module | None, disc: torch.nn.Module | None,
                      optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
                      config: dict[str, Any], keep: int, loss_scaler: dict | None = None,
                      other_ranks_rng: dict[str, torch.Tensor] | None = None,
                      processes: int = 1) -> Path:
    final = checkpoint_dir(run, step)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet_trainable.items()}
    if vgt is not None:
        model.update({f"vgt.{k}": v.detach().cpu().contiguous() for k, v in vgt.state_dict().items()})
    save_file(model, str(tmp / "model.safetensors"), metadata={"format": str(FORMAT)})
    if disc is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()},
                  str(tmp / "disc.safetensors"))
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_meta = {name: _flatten_optimizer(opt.state_dict(), name, opt_tensors) for name, opt in optimizers.items()}
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optim.safetensors"))
    (tmp / "optim.json").write_text(json.dumps(opt_meta))
    rng = {"torch_cpu": torch.get_rng_state(), "data": generator.get_state(), **(other_ranks_rng or {})}
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    state = {"format": FORMAT, "step": step, "config": config, "processes": processes}
    if loss_scaler is not None:  # fp16 training: the GradScaler's scale and growth tracker
        state["loss_scaler"] = loss_scaler
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old_step, old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"checkpoint {ckpt} is unreadable: {err}") from err
    if state.get("format") != FORMAT:
        raise InputError(f"checkpoint {ckpt} has format {state.get('format')!r}; this apla reads format {FORMAT}")
    return state


def load_model_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable UNet tensors, VGT state dict) from a checkpoint."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    unet = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
    vgt = {k[4:]: v for k, v in tensors.items() if k.startswith("vgt.")}
    return unet, vgt


def rank_rng_keys(rank: int) -> tuple[str, str]:
    """The ``rng.safetensors`` keys of a process's (global torch RNG, data generator) states."""
    return ("torch_cpu", "data") if rank == 0 else (f"torch_cpu.rank{rank}", f"data.rank{rank}")


def load_training_state(ckpt: Path, optimizers: dict[str, torch.optim.Optimizer],
                        disc: torch.nn.Module | None, generator: torch.Generator,
                        rank: int = 0) -> tuple[int, bool]:
    """Restore optimisers, discriminator and process ``rank``'s RNG states: (step, whether
    the checkpoint held this rank's RNG states; a checkpoint written by fewer processes
    does not)."""
    try:
        meta = json.loads((ckpt / "optim.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"checkpoint file {ckpt / 'optim.json'} is missing or damaged ({err}); "
                             f"resume from an earlier checkpoint, or retrain") from err
    tensors = load_file(str(ckpt / "optim.safetensors"))
    for name, opt in optimizers.items():
        opt.load_state_dict(_unflatten_optimizer(meta[name], tensors))
    if disc is not None:
        disc.load_state_dict(load_file(str(ckpt / "disc.safetensors")), strict=True)
    rng = load_file(str(ckpt / "rng.safetensors"))
    global_key, data_key = rank_rng_keys(rank)
    found = global_key in rng and data_key in rng
    if rank == 0 and not found:
        raise IntegrityError(f"checkpoint file {ckpt / 'rng.safetensors'} lacks the random states "
                             f"({global_key!r}, {data_key!r}); resume from an earlier checkpoint, "
                             "or retrain")
    if found:
        torch.set_rng_state(rng[global_key])
        generator.set_state(rng[data_key])
    return int(read_state(ckpt)["step"]), found
