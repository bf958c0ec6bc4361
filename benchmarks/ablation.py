"""APLA's comparison: Tune-A-Video vs the VGT variants, trained and measured the same way.

    nice -n 10 python benchmarks/ablation.py                # tiny CPU preset, ~30 min on 2 cores
    python benchmarks/ablation.py --quick --out /tmp/abl    # smoke test (1 clip, 2 methods)
    python benchmarks/ablation.py --pretrained models/sd-1-5 --clip models/clip-vit-large-patch14

For each clip in ``shared/data`` with its training prompt (spec section 6), every method is
trained with ``apla_train.train.train`` from the same seed for the same number of steps. Each
run is then rebuilt from its last checkpoint and sampled with the PyTorch reference sampler
from its inverted start latent: the training prompt (reconstruction) and the edited prompts
(text-to-video), recording ||delta|| / ||eps_theta|| at every DDIM step. Every video is
measured with ``apla_eval.report.evaluate``. Written under ``--out``::

    ablation.md                       the table, settings and what the numbers can and cannot say
    ablation/results.json             every number, per run and per video
    ablation/metrics.png              metrics per method (bars)
    ablation/ratio.png                ||delta|| / ||eps_theta|| over the denoising steps (Fig. 5b)
    ablation/frames-<clip>.png        the source, each method's reconstruction and first edit

Runs (checkpoints, sampled mp4s) go to ``--runs`` (default ``runs/ablation``, not in git).
The plots and the report are drawn by ``benchmarks/ablation_report.py``.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
from ablation_report import fmt, markdown, mean_or_none, plot_frames, plot_metrics, plot_ratio

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data"

# Training prompt and edited prompts per clip (spec section 6, from Tune-A-Video's configs).
CLIPS = {
    "man-skiing": ("a man is skiing", [
        "mickey mouse is skiing on the snow", "spider man is skiing on the beach, cartoon style",
        "wonder woman, wearing a cowboy hat, is skiing", "a man, wearing pink clothes, is skiing at sunset"]),
    "car-turn": ("a jeep car is moving on the road", [
        "a jeep car is moving on the beach", "a jeep car is moving on the snow",
        "a jeep car is moving on the road, cartoon style", "a sports car is moving on the road"]),
}


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    overrides: tuple[str, ...]  # --set items applied over the preset


METHODS = (
    Method("none", "Tune-A-Video: no VGT, MSE only, no discriminator",
           ("vgt.kind=none", "loss.l_l1=0", "loss.l_per=0", "loss.l_adv=0")),
    Method("pure", "VGT-Pure (causal), Hyper-Loss + adversarial", ("vgt.kind=pure",)),
    Method("hyper", "VGT-Hyper (causal), Hyper-Loss + adversarial", ("vgt.kind=hyper",)),
    Method("pure-EN", "VGT-Pure without masks (encoder)", ("vgt.kind=pure", "vgt.mask=none")),
    Method("hyper-EN", "VGT-Hyper without masks (encoder)", ("vgt.kind=hyper", "vgt.mask=none")),
    Method("hyper-noadv", "VGT-Hyper, Hyper-Loss only (loss.l_adv=0)", ("vgt.kind=hyper", "loss.l_adv=0")),
    Method("pure-noadv", "VGT-Pure, Hyper-Loss only (loss.l_adv=0)", ("vgt.kind=pure", "loss.l_adv=0")),
)
QUICK_METHODS = ("none", "hyper")


@dataclass
class Settings:
    preset: str  # "tiny" or "sd"
    frames: int | None  # None: the config's default
    size: int | None
    steps: int | None
    sample_steps: int | None
    seed: int
    threads: int
    edits: int  # edited prompts per clip
    methods: tuple[str, ...]
    clips: tuple[str, ...]


# Defaults for the tiny preset, sized for ~30 min on a shared 2-core CPU (measured: see the doc).
TINY_DEFAULTS = {"frames": 8, "size": 64, "steps": 80, "sample_steps": 15}
QUICK = {"frames": 4, "size": 32, "steps": 3, "sample_steps": 2}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# One run: train, rebuild, sample every prompt, evaluate every video


def build_run_config(clip: Path, prompt: str, method: Method, s: Settings, pretrained: str | None):
    from apla_train.cli import build_config

    overrides = list(method.overrides)
    if s.sample_steps is not None:
        overrides += [f"sample.steps={s.sample_steps}", f"sample.inversion_steps={s.sample_steps}"]
    if s.steps is not None:
        overrides.append(f"train.checkpoint_every={s.steps}")  # only the final checkpoint
    flags = {"train.steps": s.steps, "data.n_frames": s.frames, "data.size": s.size, "train.seed": s.seed}
    return build_config(str(clip), prompt, "tiny" if pretrained is None else None, pretrained, None,
                        tuple(overrides), flags)


def _video_metrics(report, reference: np.ndarray | None = None, frames: np.ndarray | None = None) -> dict:
    m = report.metrics
    fc = m["frame_consistency"] or {}
    out = {"fc_all": fc.get("all_pairs"), "fc_consecutive": fc.get("consecutive"),
           "clip_score": m["clip_score"], "warp_error": m["warp_error"],
           "p99_flow_px": m["motion"]["p99_flow_px"], "mean_flow_px": m["motion"]["mean_flow_px"],
           "is_static": m["motion"]["is_static"],
           "psnr": m["psnr"]["mean"] if m.get("psnr") else None,
           "ssim": m["ssim"]["mean"] if m.get("ssim") else None}
    if reference is not None and frames is not None:  # how far an edit moved from the reconstruction
        from apla_eval.metrics import psnr

        out["psnr_vs_reconstruction"] = psnr(frames, reference)["mean"]
    return out


def run_one(clip: Path, clip_name: str, method: Method, s: Settings, runs: Path, embedder,
            pretrained: str | None) -> dict:
    import torch

    from apla_eval.report import evaluate
    from apla_rt.media.video import read_video, write_video
    from apla_train.checkpoint import latest_checkpoint
    from apla_train.components import encode_prompts
    from apla_train.sampling import ddim_sample, decode_video, encode_video
    from export.pipeline import run_start_timestep
    from apla_train.train import apply_checkpoint, build_models, train

    prompt, edits = CLIPS[clip_name]
    cfg = build_run_config(clip, prompt, method, s, pretrained)
    run = runs / clip_name / method.name
    started = time.time()
    summary = train(cfg, run, force=True, log=lambda m: None, progress=False)
    train_s = time.time() - started
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]

    # rebuild from the checkpoint, exactly as a user of the run would
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components, vgt = build_models(cfg, run)
    apply_checkpoint(components, vgt, latest_checkpoint(run), cfg.model.trainable)
    unet = components.unet.to(device).eval()
    vgt = vgt.to(device).eval() if vgt is not None else None
    components.text_encoder.to(device)
    components.codec.to(device)
    start = torch.from_numpy(np.load(run / "start_latent.npy")).to(device)
    start_t = run_start_timestep(run, cfg, components.scheduler)
    source_frames = read_video(cfg.video, start=cfg.data.start, stride=cfg.data.stride,
                               n_frames=cfg.data.n_frames, size=cfg.data.size)
    source = encode_video(components.codec, source_frames).to(device) if cfg.vgt.source else None
    uncond = encode_prompts(components, [""])
    source_note = f"{cfg.data.n_frames} frames from {cfg.data.start}, stride {cfg.data.stride}, {cfg.data.size} px"

    videos, reconstruction = [], None
    for k, text in enumerate([prompt] + edits[:s.edits]):
        ratios, timesteps = [], []

        def record(i: int, t: int, ratio: float) -> None:
            ratios.append(ratio)
            timesteps.append(t)

        cond = torch.cat([uncond, encode_prompts(components, [text])])
        z = ddim_sample(unet, vgt, start, cond, components.scheduler, cfg.sample.steps,
                        cfg.sample.guidance, source, callback=record, start_timestep=start_t)
        frames = decode_video(components.codec, z)
        write_video(run / "samples" / f"{k}.mp4", frames, fps=cfg.sample.fps, force=True)
        is_recon = k == 0
        report = evaluate(frames, embedder=embedder, prompt=text if embedder.has_text else None,
                          source=source_frames if is_recon else None, source_note=source_note, lpips=False)
        metrics = _video_metrics(report, None if is_recon else reconstruction, frames)
        if is_recon:
            reconstruction = frames
        videos.append({"prompt": text, "kind": "reconstruction" if is_recon else "edit",
                       "file": str((run / "samples" / f"{k}.mp4").resolve()), "metrics": metrics,
                       "ratio": ratios, "timesteps": timesteps, "_frames": frames})
    sample_s = time.time() - started
    last = history[-10:]
    return {
        "clip": clip_name, "method": method.name, "run": str(run.resolve()),
        "train": {"seconds": round(train_s, 1), "steps": cfg.train.steps,
                  "loss_first10": summary.get("loss_first10"), "loss_last10": summary.get("loss_last10"),
                  "mse_last10": mean_or_none([h["mse"] for h in last]),
                  "ratio_last10": mean_or_none([h["ratio"] for h in last]),
                  "ratio_curve": [h["ratio"] for h in history], "loss_curve": [h["loss"] for h in history],
                  "reconstruction_psnr_db_at_train": summary.get("reconstruction_psnr_db"),
                  "autoencoder_psnr_db": summary.get("autoencoder_psnr_db")},
        "sample_seconds": round(sample_s, 1), "videos": videos,
        "config": cfg.to_dict(), "source_frames": source_frames,
    }


def source_row(runs_meta: dict, embedder) -> dict:
    """The source clips themselves, as read for training: what a real video scores."""
    from apla_eval.report import evaluate

    rows = [_video_metrics(evaluate(frames, embedder=embedder, lpips=False)) for frames in runs_meta.values()]
    out = {key: mean_or_none([r[key] for r in rows]) for key in ("fc_all", "fc_consecutive", "warp_error", "p99_flow_px")}
    out["static"] = f"{sum(r['is_static'] for r in rows)}/{len(rows)}"
    return out


# ---------------------------------------------------------------------------------------
# Aggregation

METRICS = ("fc_all", "fc_consecutive", "clip_score", "warp_error", "p99_flow_px", "psnr", "ssim",
           "psnr_vs_reconstruction")


def summarise(results: list[dict], methods: tuple[str, ...]) -> dict:
    """Per method: the reconstruction mean over clips, the text-to-video mean over clips x edits."""
    out = {}
    for name in methods:
        runs = [r for r in results if r["method"] == name]
        entry = {}
        for kind, label in (("reconstruction", "reconstruction"), ("edit", "text_to_video")):
            vids = [v for r in runs for v in r["videos"] if v["kind"] == kind]
            entry[label] = {k: mean_or_none([v["metrics"].get(k) for v in vids]) for k in METRICS}
            entry[label]["static"] = f"{sum(v['metrics']['is_static'] for v in vids)}/{len(vids)}"
        entry["ratio_sampling_mean"] = mean_or_none([x for r in runs for v in r["videos"] for x in v["ratio"]])
        entry["ratio_train_last10"] = mean_or_none([r["train"]["ratio_last10"] for r in runs])
        entry["mse_train_last10"] = mean_or_none([r["train"]["mse_last10"] for r in runs])
        entry["train_seconds"] = mean_or_none([r["train"]["seconds"] for r in runs])
        entry["autoencoder_psnr_db"] = mean_or_none([r["train"]["autoencoder_psnr_db"] for r in runs])
        out[name] = entry
    return out


def _machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    for line in (info.read_text().splitlines() if info.is_file() else []):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}{gpu}")


def _git_commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


# ---------------------------------------------------------------------------------------
# Command


def run_benchmark(s: Settings, clips_dir: Path, out: Path, runs: Path, pretrained: str | None,
                  clip_model: Path | None, command: str) -> dict:
    import torch

    from apla_eval.embedders import ClipEmbedder, OfflineEmbedder
    from apla_eval.report import jsonable
    from apla_rt.folder.atomic import write_text

    torch.set_num_threads(s.threads)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # per-run save/load bars would drown the log
    transformers_logging.disable_progress_bar()
    started = time.time()
    embedder = ClipEmbedder(clip_model) if clip_model is not None else OfflineEmbedder()
    methods = [m for m in METHODS if m.name in s.methods]
    results, sources = [], {}
    total = len(s.clips) * len(methods)
    for ci, clip_name in enumerate(s.clips):
        for mi, method in enumerate(methods):
            n = ci * len(methods) + mi + 1
            log(f"[{n}/{total} {(time.time() - started) / 60:5.1f} min] {clip_name} / {method.name}")
            r = run_one(clips_dir / f"{clip_name}.mp4", clip_name, method, s, runs, embedder, pretrained)
            sources[clip_name] = r["source_frames"]
            log(f"    trained in {r['train']['seconds']:.0f} s, sampled + measured in {r['sample_seconds']:.0f} s; "
                f"rec FC {fmt(r['videos'][0]['metrics']['fc_all'])}, PSNR {fmt(r['videos'][0]['metrics']['psnr'], 2)}")
            results.append(r)
    names = tuple(m.name for m in methods)
    summary = summarise(results, names)
    source = source_row(sources, embedder)
    cfg = results[0]["config"]
    meta = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y"),
        "machine": _machine(), "git_commit": _git_commit(), "settings": asdict(s), "embedder": embedder.name,
        "embedder_is_clip": bool(embedder.is_clip), "guidance": cfg["sample"]["guidance"],
        "model_note": (f"Stable Diffusion from {pretrained}" if pretrained else
                       "tiny preset (`apla_train.config.tiny_preset`), randomly initialised"),
        "methods": [asdict(m) for m in methods],
        "clips": {c: {"prompt": CLIPS[c][0], "edits": CLIPS[c][1][:s.edits]} for c in s.clips},
    }
    figures = out / "ablation"
    plot_metrics(summary, figures / "metrics.png", meta["embedder_is_clip"])
    plot_ratio(results, names, figures / "ratio.png")
    for c in s.clips:
        plot_frames(results, c, names, figures / f"frames-{c}.png")
    meta["runtime_s"] = round(time.time() - started, 1)
    payload = jsonable({**meta, "summary": summary, "source": source, "runs": results},
                       keep=lambda key: not key.startswith("_") and key != "source_frames")
    write_text(figures / "results.json", json.dumps(payload, indent=1, allow_nan=False) + "\n", force=True)
    write_text(out / "ablation.md", markdown(meta, summary, source, results, TINY_DEFAULTS), force=True)
    log(f"done in {meta['runtime_s'] / 60:.1f} min: {out / 'ablation.md'}")
    return payload


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--clips", "clips_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CLIPS,
              show_default=True, help="Folder with man-skiing.mp4 and car-turn.mp4.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=REPO / "docs", show_default=True,
              help="Writes OUT/ablation.md and OUT/ablation/ (results.json, PNGs).")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path),
              default=REPO / "runs" / "ablation", show_default=True,
              help="Scratch folder for the training runs (replaced run by run).")
@click.option("--pretrained", type=click.Path(path_type=str), help="SD 1.x diffusers folder (else the tiny preset).")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps [tiny: 80; SD: config default].")
@click.option("--frames", type=click.IntRange(min=2), help="Frames per clip [tiny: 8; SD: config default].")
@click.option("--size", type=click.IntRange(min=8), help="Resolution in px [tiny: 64; SD: config default].")
@click.option("--sample-steps", type=click.IntRange(min=1), help="DDIM steps for inversion and sampling [tiny: 15].")
@click.option("--seed", type=int, default=33, show_default=True)
@click.option("--edits", type=click.IntRange(min=0, max=4), help="Edited prompts per clip [4; quick: 1].")
@click.option("--methods", help=f"Comma-separated subset of {', '.join(m.name for m in METHODS)}.")
@click.option("--clip", "clip_model", type=click.Path(path_type=Path),
              help="Local CLIP folder (else the offline embedder, NOT CLIP).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads (1 is fastest on a shared 2-core machine).")
@click.option("--quick", is_flag=True, help="Smoke test: 1 clip, 2 methods, 3 steps, 2 sample steps, 1 edit.")
def main(clips_dir, out, runs_dir, pretrained, steps, frames, size, sample_steps, seed, edits, methods, clip_model,
         threads, quick):
    """Train and measure Tune-A-Video and the APLA variants on the clips in shared/data."""
    from apla_rt.errors import AplaError

    base = QUICK if quick else (TINY_DEFAULTS if pretrained is None else dict.fromkeys(TINY_DEFAULTS))
    chosen = tuple(x.strip() for x in methods.split(",")) if methods else \
        (QUICK_METHODS if quick else tuple(m.name for m in METHODS))
    unknown = sorted(set(chosen) - {m.name for m in METHODS})
    if unknown or not chosen:
        raise click.UsageError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                               f"choose from {', '.join(m.name for m in METHODS)}")
    available = tuple(c for c in CLIPS if (clips_dir / f"{c}.mp4").is_file())
    if not available:
        raise click.UsageError(f"no clip of {', '.join(f'{c}.mp4' for c in CLIPS)} in {clips_dir}")
    s = Settings(preset="tiny" if pretrained is None else "sd",
                 frames=frames or base["frames"], size=size or base["size"], steps=steps or base["steps"],
                 sample_steps=sample_steps or base["sample_steps"], seed=seed, threads=threads,
                 edits=edits if edits is not None else (1 if quick else 4), methods=chosen,
                 clips=available[:1] if quick else available)
    command = "python benchmarks/ablation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        run_benchmark(s, clips_dir, out, runs_dir, pretrained, clip_model, command.strip())
    except AplaError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
