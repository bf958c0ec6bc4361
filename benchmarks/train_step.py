"""Seconds per APLA training step and peak memory on CPU (fp32).

    python benchmarks/train_step.py [--config tiny|large|all] [--threads 2] [--steps 10]
                                    [--warmup 2] [--json]

One step is ``apla_train.train``'s ``generator_step`` then ``discriminator_step``, written out
with the same library functions and without Accelerate: one t for the clip, noise, z_t; eps_hat = UNet3D(z_t, t, c) + VGT(z_t, t); Hyper-Loss (MSE +
L1) + l_adv x the adversarial term; backward, grad clip, AdamW; then the discriminator's
Adam step. The adversarial term is on (the steady state after ``loss.adv_start``); the
perceptual term is off (as in the tiny preset: LPIPS needs backbone weights). Inputs are
seeded random latents and text states of the real shapes (the cost does not depend on the
content). The time is the median over ``--steps`` steps after ``--warmup`` steps (wall
clock; min and max too), and ``cpu s`` the median CPU time of the process per step (all
threads; on a machine shared with other jobs it moves less than the wall clock).

Configs:

* ``tiny``: the ``--model tiny`` preset as trained by the CPU quickstart: UNet widths
  (32, 64), 8 frames at 64 px (16x16 latents), VGT d=64, 4 heads, patch 2, 1+1 blocks,
  every UNet parameter trainable.
* ``large``: UNet widths (64, 128) with 32 groups, 16 frames at 128 px (32x32 latents),
  VGT d=128, 8 heads, patch 4, 2+2 blocks, the Tune-A-Video trainable subset.

Each config runs in its own process, so that the peak RSS (``resource.getrusage``'s
``ru_maxrss``) is that config's alone; ``rss_after_import_mib`` is the same measure taken
after the imports, before any model is built.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("tiny", "large")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def build(name: str):
    """(unet, vgt, disc, cfg, latent shape) for a benchmark config, seeded."""
    import torch
    from diffusers import UNet2DConditionModel

    from apla_train.components import tiny_unet2d_config
    from apla_train.config import from_dict, tiny_preset
    from apla_train.discriminator import Discriminator
    from apla_train.unet3d import UNet3DConditionModel
    from apla_train.vgt import build_vgt

    if name == "tiny":
        cfg = from_dict(tiny_preset()).validate()
        unet_cfg = tiny_unet2d_config()
    elif name == "large":
        cfg = from_dict({
            "data": {"n_frames": 16, "size": 128},
            "model": {"preset": "tiny", "trainable": "tav"},
            "vgt": {"dim": 128, "heads": 8, "patch": 4, "spatial_layers": 2, "temporal_layers": 2},
            "disc": {"hidden": [32, 64]},
            "loss": {"l_per": 0.0},
            "train": {"lr": 1e-3, "vgt_lr": 1e-3},
        }).validate()
        unet_cfg = {**tiny_unet2d_config(), "block_out_channels": (64, 128), "norm_num_groups": 32}
    else:
        raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    patch = cfg.model.tiny_patch  # the tiny preset's autoencoder: p pixels per latent cell
    latent = cfg.data.size // patch
    torch.manual_seed(cfg.train.seed)
    unet = UNet3DConditionModel(UNet2DConditionModel(**unet_cfg), temporal=cfg.model.temporal)
    vgt = build_vgt(cfg.vgt, 4, latent)
    disc = Discriminator(cfg.disc, 4, cfg.data.n_frames)
    return unet, vgt, disc, cfg, (1, 4, cfg.data.n_frames, latent, latent), unet_cfg


def run_one(name: str, threads: int, steps: int, warmup: int) -> dict:
    import torch

    from apla_rt.sampling.schedule import SchedulerConfig, alphas_cumprod
    from apla_train.losses import discriminator_loss, generator_adv_loss, hyper_terms, perturbation_ratio
    from apla_train.train import _trainable

    torch.set_num_threads(threads)
    rss_import = _maxrss_mib()
    unet, vgt, disc, cfg, shape, unet_cfg = build(name)
    trainable = _trainable(unet, cfg.model.trainable)
    opt = torch.optim.AdamW([{"params": list(trainable.values()), "lr": cfg.train.lr},
                             {"params": list(vgt.parameters()), "lr": cfg.train.vgt_lr}],
                            betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    dopt = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=cfg.disc.betas)
    unet.train()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(shape, generator=g)
    cond = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=g)
    abar = torch.from_numpy(alphas_cumprod(SchedulerConfig())).float()
    params = list(trainable.values()) + list(vgt.parameters())

    def step() -> dict:
        t = torch.randint(0, 1000, (1,), generator=g)
        noise = torch.randn(shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1, 1)
        z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        eps_theta = unet(z_t, t, cond)
        delta = vgt(z_t, t)
        eps_hat = eps_theta + delta
        terms = hyper_terms(eps_hat, noise)
        terms["adv"] = generator_adv_loss(disc, eps_hat)
        loss = cfg.loss.l_mse * terms["mse"] + cfg.loss.l_l1 * terms["l1"] + cfg.loss.l_adv * terms["adv"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dopt.zero_grad(set_to_none=True)  # drop the generator pass's gradients on D
        d_loss = discriminator_loss(disc, noise, eps_hat.detach())
        d_loss.backward()
        dopt.step()
        dopt.zero_grad(set_to_none=True)
        return {"loss": float(loss), "ratio": float(perturbation_ratio(delta, eps_theta))}

    times, cpu_times = [], []
    last = {}
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        last = step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "config": name,
        "threads": threads,
        "frames": cfg.data.n_frames, "size_px": cfg.data.size, "latent": list(shape[-2:]),
        "unet_widths": list(unet_cfg["block_out_channels"]),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "unet_trainable": sum(p.numel() for p in trainable.values()),
        "vgt": f"{cfg.vgt.kind} d={cfg.vgt.dim} heads={cfg.vgt.heads} patch={cfg.vgt.patch} "
               f"blocks={cfg.vgt.spatial_layers}+{cfg.vgt.temporal_layers}",
        "vgt_params": sum(p.numel() for p in vgt.parameters()),
        "steps": steps, "warmup": warmup,
        "sec_per_step_median": round(statistics.median(times), 4),
        "sec_per_step_min": round(min(times), 4),
        "sec_per_step_max": round(max(times), 4),
        "cpu_sec_per_step_median": round(statistics.median(cpu_times), 4),
        "rss_after_import_mib": round(rss_import, 1),
        "peak_rss_mib": round(_maxrss_mib(), 1),
        "final_loss": round(last["loss"], 4),
    }


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="all", choices=[*CONFIGS, "all"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--threads and --steps must be at least 1, --warmup at least 0")

    if args._child:
        print(json.dumps(run_one(args.config, args.threads, args.steps, args.warmup)))
        return
    results = []
    for name in (CONFIGS if args.config == "all" else (args.config,)):
        cmd = [sys.executable, __file__, "--_child", "--config", name, "--threads", str(args.threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"benchmark {name} failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {"machine": machine(), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"# {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {args.threads} threads, fp32")
    print(f"{'config':<6} {'frames':>6} {'px':>4} {'latent':>7} {'unet':>9} {'trainable':>9} {'vgt':>8} "
          f"{'s/step':>7} {'min':>7} {'max':>7} {'cpu s':>7} {'peak RSS':>9}")
    for r in results:
        print(f"{r['config']:<6} {r['frames']:>6} {r['size_px']:>4} {'x'.join(map(str, r['latent'])):>7} "
              f"{r['unet_params'] / 1e6:>8.2f}M {r['unet_trainable'] / 1e6:>8.2f}M {r['vgt_params'] / 1e6:>7.2f}M "
              f"{r['sec_per_step_median']:>7.3f} {r['sec_per_step_min']:>7.3f} {r['sec_per_step_max']:>7.3f} "
              f"{r['cpu_sec_per_step_median']:>7.3f} "
              f"{r['peak_rss_mib']:>6.0f} MiB")
    for r in results:
        print(f"  {r['config']}: UNet widths {tuple(r['unet_widths'])}, VGT {r['vgt']}; median of {r['steps']} "
              f"steps after {r['warmup']} warm-up; RSS after imports {r['rss_after_import_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
