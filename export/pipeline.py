"""Run folder -> engine folder: rebuild, export, validate, (TensorRT), manifest.

The engine folder is built in a hidden sibling and swapped in only when everything passed
(``apla_rt.folder.atomic.atomic_dir``): an interrupted or failed export leaves a previous folder
intact. A lock file next to it makes a second concurrent export of the same folder refuse.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from apla_rt.folder.atomic import atomic_dir, check_writable
from apla_rt.errors import BackendUnavailable, InputError, IntegrityError
from apla_rt.folder.files import sha256_file
from apla_rt.folder.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
from apla_rt.sampling.schedule import SchedulerConfig
from apla_rt.sampling.solvers import inverted_timestep

from apla_train.deepcache import DEFAULT_BRANCH

from .fp16 import FP16_NETWORKS, export_fp16
from .int8 import Int8Options
from .lock import export_lock
from .networks import network_specs
from .onnx_export import WeightStore, export_onnx, graph_io, onnx_opset
from .validate import compare_network, reference_outputs

def load_run(run: Path):
    """Rebuild the run's networks from its config and latest checkpoint (strictly)."""
    from apla_train import checkpoint as ckpt
    from apla_train.config import from_dict
    from apla_train.train import apply_checkpoint, build_models

    if not (run / "config.json").is_file():
        raise InputError(f"--run {run} is not a training run folder (no config.json)")
    try:
        data = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--run {run}: cannot read config.json ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"--run {run}: config.json is not a config (expected a JSON object)")
    cfg = from_dict(data).validate()
    last = ckpt.latest_checkpoint(run)
    if last is None:
        raise InputError(f"--run {run} has no complete checkpoint yet; train it first")
    components, vgt = build_models(cfg, run)
    apply_checkpoint(components, vgt, last, cfg.model.trainable)
    components.unet.eval()
    if vgt is not None:
        vgt.eval()
    return cfg, components, vgt, last


def frame_profile(cfg, frames_min: int | None, frames_opt: int | None, frames_max: int | None) -> tuple[int, int, int]:
    fopt = frames_opt or cfg.data.n_frames
    fmin = frames_min or 1
    fmax = frames_max or min(max(24, 2 * cfg.data.n_frames), cfg.vgt.max_frames)
    if not 1 <= fmin <= fopt <= fmax:
        raise InputError(f"frame profile must satisfy 1 <= min <= opt <= max (got {fmin}, {fopt}, {fmax})")
    if cfg.vgt.kind != "none" and fmax > cfg.vgt.max_frames:
        raise InputError(f"--frames-max {fmax} exceeds the VGT's {cfg.vgt.max_frames} frame positions")
    return fmin, fopt, fmax


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's malloc keeps
    them otherwise), so that the next stage's peak does not stack on the last one's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _release_modules(spec) -> None:
    """Drop the spec's PyTorch modules (validation compares against stored outputs)."""
    spec.module = None
    spec.ort_module = None
    release_memory()


def weight_groups(specs) -> list[tuple[str, list]]:
    """The specs grouped by the external-data file their graphs share (``spec.weights``, else
    their own name), in ``specs``' order, the UNet's group last."""
    groups: dict[str, list] = {}
    for spec in specs:
        groups.setdefault(spec.weights or spec.name, []).append(spec)
    return sorted(groups.items(), key=lambda item: item[0].startswith("unet"))


def flavours(spec) -> list[tuple[str, bool]]:
    """(graph label, ONNX Runtime flavour) of each graph written for ``spec``: the portable
    graph, then the fused-attention one where the spec has it."""
    return [(spec.name, False)] + ([(spec.name + ".ort", True)] if spec.ort_module is not None else [])


def _versions(opset: int) -> dict[str, str]:
    import onnx
    import onnxruntime

    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "opset": str(opset)}
    for pkg in ("apla", "diffusers", "transformers", "polygraphy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _check_graph_io(spec, path: Path) -> None:
    """The graph's inputs/outputs carry exactly the contract's names and dims."""
    io = graph_io(path)
    for t in spec.inputs + spec.outputs:
        got = io["inputs" if t in spec.inputs else "outputs"].get(t.name)
        if got is None or [d if isinstance(d, str) else int(d) for d in t.dims] != got:
            raise IntegrityError(f"{spec.name}: ONNX tensor {t.name} has dims {got}, expected {t.dims}")


def export_group(group, tmp: Path, store: WeightStore, dynamo: bool, threads: int,
                 log: Callable[[str], None]) -> list[tuple]:
    """Export and validate the graphs of specs that share one weight file (``weight_groups``);
    returns (spec, label, ort flavour, files, validation result) per graph.

    Every graph of the group (both flavours) is traced and its PyTorch outputs kept before
    any ONNX Runtime session opens; then the group's modules are freed and the sessions open
    one at a time: the PyTorch weights the graphs share and a session's copy of them are
    never in memory together (``benchmarks/export_memory.py``)."""
    exported = []
    for spec in group:
        refs_at: dict[str, list] = {}  # shapes -> PyTorch outputs: both flavours compare against one set
        for label, ort_flavour in flavours(spec):
            started = time.time()
            files = export_onnx(spec, spec.validate_at[0], tmp / f"{label}.onnx", dynamo=dynamo,
                                ort_flavour=ort_flavour, store=store, external=spec.weights is not None)
            export_s = time.time() - started
            release_memory()  # the exporter's transient copies, before the next trace
            _check_graph_io(spec, files[0])
            shapes = None if ort_flavour else spec.portable_validate_at
            if shapes:
                log(f"{label}: validated at small shapes; its decomposed attention at the full "
                    f"shapes would not fit in memory (the .ort flavour is validated at full size)")
            if repr(shapes) not in refs_at:
                refs_at[repr(shapes)] = reference_outputs(spec, shapes)
            exported.append((spec, label, ort_flavour, files, export_s, refs_at[repr(shapes)]))
    for spec in group:
        _release_modules(spec)
    results = []
    for spec, label, ort_flavour, files, export_s, refs in exported:
        result = compare_network(spec, files[0], refs, threads)
        release_memory()
        result["export_seconds"] = round(export_s, 2)
        worst = max(c["max_abs"] for c in result["checks"])
        shapes = sorted({tuple(sorted(c["shape"].items())) for c in result["checks"]})
        log(f"{label:13s} exported in {export_s:5.1f} s; ORT vs PyTorch max abs {worst:.2e} "
            f"(tolerance {spec.tolerance['max_abs']:.0e}) at {len(shapes)} shapes: "
            f"{'ok' if result['passed'] else 'FAILED'}")
        results.append((spec, label, ort_flavour, files, result))
    return results


def run_start_timestep(run: Path, cfg, scheduler: SchedulerConfig) -> int:
    """The timestep the run's ``start_latent.npy`` belongs to: ``summary.json``'s record, else
    a DDIM inversion with the inversion steps it used (``summary.json``) or configured."""
    path = run / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    recorded = summary.get("start_timestep")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded
    return inverted_timestep(scheduler, int(summary.get("inversion_steps", cfg.sample.inversion_steps)))


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, fp16: bool = False, backend: str = "auto",
               frames_min: int | None = None, frames_opt: int | None = None, frames_max: int | None = None,
               force: bool = False, dynamo: bool = False, cache_branch: int | None = DEFAULT_BRANCH,
               int8: "Int8Options | None" = None, log: Callable[[str], None] = print) -> dict:
    """Export a run; returns the manifest. Raises ``AplaError`` on user errors and failures.

    ``cache_branch``: the skip branch of the DeepCache graphs (``unet_feature``,
    ``unet_shallow``; 0 = the outermost), None for no cache graphs. ``int8``: also quantize
    (``export.int8``), in the folder before it is swapped in."""
    run, out = Path(run), Path(out)
    if int8 is not None:
        int8 = int8.check()
    if backend not in ("auto", "onnx", "trt"):
        raise InputError(f"unknown backend {backend!r} (auto, onnx or trt)")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise InputError(f"--out {out} would replace the run folder {run}; choose another --out")
    check_writable(out, force)
    trt_reason = None
    if backend in ("auto", "trt"):
        from .trt import trt_available

        ok, reason = trt_available()
        if not ok:
            if backend == "trt":
                raise BackendUnavailable(f"cannot build TensorRT engines: {reason}")
            trt_reason = reason
    cfg, components, vgt, last = load_run(run)
    frames = frame_profile(cfg, frames_min, frames_opt, frames_max)
    if cache_branch is not None:
        from apla_train.deepcache import check_branch

        cache_branch = check_branch(components.unet, cache_branch)
    specs = network_specs(components, vgt, cfg, frames, cache_branch)
    threads = torch.get_num_threads()
    # what the manifest needs from the models; the specs hold the only references to the
    # networks from here on, and each weight group's are dropped once its graphs are exported
    tokenizer, scheduler, codec = components.tokenizer, components.scheduler.to_dict(), components.codec
    codec_info = {"vae_scaling_factor": codec.scaling_factor, "latent_channels": codec.latent_channels,
                  "vae_downsample": codec.downsample}
    del components, vgt, codec

    with export_lock(out), atomic_dir(out, force=force) as tmp:
        networks: dict = {}
        report: dict = {"networks": {}, "frames_profile": list(frames)}
        order = [spec.name for spec in specs]
        # one group per weight file (the UNet family shares one), the UNet's last: the
        # smaller networks' modules are freed by the time it is traced
        for key, group in weight_groups(specs):
            store = WeightStore(tmp / f"{key}.onnx.data")
            for spec, label, ort_flavour, files, result in export_group(group, tmp, store, dynamo, threads, log):
                report["networks"][label] = result
                entry = networks.setdefault(spec.name, {})
                data = [f.name for f in files[1:]]
                if ort_flavour:
                    entry["onnx_ort"] = files[0].name
                    entry["external_data"] += [d for d in data if d not in entry["external_data"]]
                else:
                    entry.update({
                        "onnx": files[0].name, "external_data": data, "engine": None,
                        "inputs": [t.to_dict() for t in spec.inputs],
                        "outputs": [t.to_dict() for t in spec.outputs],
                        "profile": spec.profile, "tolerance": spec.tolerance,
                    })
            for spec in group:
                if fp16 and spec.name in FP16_NETWORKS:
                    updates, report["networks"][spec.name + ".fp16"] = export_fp16(
                        spec, tmp, networks[spec.name], cfg.data.size, threads, log)
                    networks[spec.name].update(updates)
        networks = {name: networks[name] for name in order}
        report["networks"] = {label: report["networks"][label] for name in order
                              for label in (name, name + ".ort", name + ".fp16") if label in report["networks"]}
        (tmp / "validation.json").write_text(json.dumps(report, indent=2))
        failed = [n for n, r in report["networks"].items() if not r["passed"] and not n.endswith(".fp16")]
        if failed:
            raise IntegrityError(f"validation failed for {', '.join(failed)} (report: "
                                 f"{tmp.name}/validation.json was discarded; re-run to inspect)")

        tokenizer.save_pretrained(tmp / "tokenizer")
        start_latent = start_timestep = None
        if (run / "start_latent.npy").is_file():
            start_timestep = run_start_timestep(run, cfg, SchedulerConfig.from_dict(scheduler))
            latent = np.load(run / "start_latent.npy", allow_pickle=False)
            np.save(tmp / "start_latent.npy", latent.astype(np.float32), allow_pickle=False)
            start_latent = "start_latent.npy"
        source_latent = None
        if cfg.vgt.source and (run / "source_latent.npy").is_file():
            latent = np.load(run / "source_latent.npy", allow_pickle=False)
            np.save(tmp / "source_latent.npy", latent.astype(np.float32), allow_pickle=False)
            source_latent = "source_latent.npy"
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": out.name, "run": run.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "networks": networks,
            "scheduler": scheduler, **codec_info,
            "image_size": cfg.data.size, "latent_size": cfg.data.size // codec_info["vae_downsample"],
            "train_frames": cfg.data.n_frames,
            "tokenizer": {"dir": "tokenizer", "model_max_length": int(tokenizer.model_max_length)},
            "start_latent": start_latent,
            "start_timestep": start_timestep,
            "source_latent": source_latent,
            "prompt": cfg.prompt,
            "sample_defaults": {"steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "fps": cfg.sample.fps,
                                "scheduler": cfg.sample.scheduler},
            "vgt_source": bool(cfg.vgt.source),
            # apla_rt.sampling.deepcache: which graphs make the deep/shallow cache, cut at which branch
            "deepcache": (None if cache_branch is None else
                          {"branch": cache_branch, "full": "unet_feature", "shallow": "unet_shallow"}),
            "checkpoint": last.name,
            "checkpoint_sha256": sha256_file(last / "model.safetensors"),
            "config": cfg.to_dict(),
            "versions": _versions(onnx_opset(dynamo)),
        }
        if trt_reason is None and backend in ("auto", "trt"):
            from .trt import build_all

            manifest = build_all(tmp, manifest, fp16=fp16, log=log, strict=False)
        manifest["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".lock")}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if int8 is not None:
            from .int8 import quantize_into

            manifest["int8"] = quantize_into(tmp, int8, log)
            manifest["files"] = json.loads((tmp / MANIFEST_NAME).read_text())["files"]
    if trt_reason is not None:
        log(f"TensorRT engines were not built: {trt_reason}; the validated ONNX folder is ready "
            f"for ONNX Runtime")
    log(f"engine folder written to {out}")
    return manifest
