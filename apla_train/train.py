"""One-shot APLA training: one video, one prompt (spec section 4).

Each step: one t for the whole clip, noise, z_t = add_noise(z0); eps_hat = UNet3D(z_t, t, c)
+ VGT(z_t, t); Hyper-Loss (MSE + L1 + LPIPS on decoded clean estimates) + the adversarial
term; then a discriminator step (real = eps, fake = eps_hat). Runs under Hugging Face
Accelerate (``accelerate launch`` for several GPUs); fp32 on CPU, fp16 autocast on CUDA.

Run folder (``--out``)::

    config.json        the full config
    base/              tiny preset only: the frozen components (diffusers format)
    checkpoints/       see checkpoint.py; resumed with --resume
    metrics.jsonl      one JSON line per step: every loss term, ratio ||delta||/||eps_theta||
    start_latent.npy   DDIM inversion of the training clip (empty prompt, the trained predictor)
    source_latent.npy  vgt.source runs only: the clip's clean latent, which that VGT reads
    sample.mp4/.gif    the training prompt sampled from start_latent (reference sampler)
    summary.json       losses at start/end, PSNR of the reconstruction, timings
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from apla_rt import atomic
from apla_rt.errors import AplaError, ConfigError, InputError, NonFiniteError, OutputExistsError
from apla_rt.schedule import alphas_cumprod
from apla_rt.video import read_video, write_video

from . import checkpoint as ckpt
from .components import (SUBFOLDERS, Components, build_tiny, byte_level_clip_tokenizer, encode_prompts,
                         load_pretrained, save_components, tokenize)
from .config import AplaConfig, from_dict
from .discriminator import Discriminator
from .losses import (default_lpips_weights, discriminator_loss, generator_adv_loss, hyper_terms, load_lpips,
                     perceptual_loss, perturbation_ratio)
from .sampling import ddim_invert, ddim_sample, decode_video, encode_video, frames_to_tensor, psnr
from .unet3d import is_trainable_name
from .vgt import build_vgt


def components_for(cfg: AplaConfig, run: Path, frames: np.ndarray | None) -> Components:
    """The frozen/pretrained parts of a run: from --pretrained, or the run's tiny base/."""
    if cfg.model.preset == "sd":
        return load_pretrained(cfg.model.pretrained, temporal=cfg.model.temporal, variant=cfg.model.variant)
    base = run / "base"
    if not (base / "model_index.json").is_file():
        if frames is None:
            raise InputError(f"run {run} has no base/ folder: it was not created by apla-train")
        tmp = run / ".base.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        from safetensors import SafetensorError
        try:
            save_components(build_tiny(frames, cfg.model.tiny_patch, cfg.train.seed,
                                       widths=cfg.model.tiny_widths), tmp)
        except (OSError, SafetensorError) as err:  # a full disk, a read-only folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise AplaError(f"could not write {base}: {getattr(err, 'strerror', None) or err}") from err
        tmp.rename(base)
    return load_pretrained(base, temporal=cfg.model.temporal)


def build_models(cfg: AplaConfig, run: Path, frames: np.ndarray | None = None) -> tuple[Components, torch.nn.Module | None]:
    """Everything needed to train, sample or export: components (with fresh temporal
    layers) and the VGT. Weights from a checkpoint are applied by ``apply_checkpoint``."""
    components = components_for(cfg, run, frames)
    latent = cfg.data.size // components.codec.downsample
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        for block in components.unet.transformer_blocks():
            components.unet._inflate(block)  # seeded, reproducible temporal init
        vgt = build_vgt(cfg.vgt, components.codec.latent_channels, latent)
    return components, vgt


def apply_checkpoint(components: Components, vgt, path: Path, mode: str) -> None:
    """Load a checkpoint's weights strictly: exactly the trainable UNet set and the VGT."""
    unet_w, vgt_w = ckpt.load_model_weights(path)
    temporal = components.unet.temporal
    expected = {n for n, _ in components.unet.named_parameters() if is_trainable_name(n, mode, temporal)}
    if set(unet_w) != expected:
        raise InputError(f"checkpoint {path} does not match the model: {len(set(unet_w) ^ expected)} "
                         f"UNet tensors differ (was it trained with another config?)")
    try:
        result = components.unet.load_state_dict(unet_w, strict=False)
        if vgt is not None:
            vgt.load_state_dict(vgt_w, strict=True)
    except RuntimeError as err:  # shapes or VGT names differ: another config's checkpoint
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise InputError(f"checkpoint {path} does not match the model ({detail}); was it trained "
                         f"with another config?") from err
    assert not result.unexpected_keys
    if vgt is None and vgt_w:
        raise InputError(f"checkpoint {path} has VGT weights but the config has vgt.kind=none")


def _trainable(unet, mode: str) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, p in unet.named_parameters():
        train = is_trainable_name(name, mode, unet.temporal)
        p.requires_grad_(train)
        if train:
            params[name] = p
    return params


def _mixed_precision(cfg: AplaConfig) -> str:
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    return "fp16" if torch.cuda.is_available() else "no"


def _write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n", force=True)


def prepare_run(cfg: AplaConfig, run: Path, resume: bool, force: bool,
                steps: int | None = None) -> AplaConfig:
    """Create or reopen the run folder; with --resume the saved config is authoritative,
    except ``steps``, which may extend (never shorten below the last checkpoint) the run."""
    saved = run / "config.json"
    if resume:
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
            _write_json(saved, resumed.to_dict())
        return resumed
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
    _write_json(saved, cfg.to_dict())
    return cfg


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


def check_inputs(cfg: AplaConfig) -> np.ndarray:
    """What a new run can check before its folder is touched (numbers, clip, prompt), so that
    bad input neither leaves a half-made run nor removes an old one under --force."""
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
    frames = read_video(cfg.video, start=cfg.data.start, stride=cfg.data.stride,
                        n_frames=cfg.data.n_frames, size=cfg.data.size)
    if cfg.model.preset == "tiny":
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            tokenize(byte_level_clip_tokenizer(Path(tmp)), [cfg.prompt])
    else:
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
    if cfg.loss.l_per > 0:
        weights = cfg.loss.lpips_weights or default_lpips_weights(cfg.loss.lpips_net)
        if not Path(weights).is_file():
            load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights)  # raises its one-line explanation
    return frames


def train(cfg: AplaConfig, run: Path, *, resume: bool = False, force: bool = False,
          log: Callable[[str], None] = print, progress: bool = True, steps: int | None = None) -> dict:
    """Train (or with ``resume`` continue, optionally to ``steps``) the run in ``run``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run = Path(run)
    # first, so that under `accelerate launch` only the main process sets the run folder up
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available())
    device = accelerator.device
    is_main = accelerator.is_main_process
    if not is_main:  # one voice: the other processes' messages would repeat the main one's
        log = _silent
    frames = None
    if is_main:
        frames = None if resume else check_inputs(cfg)
        existed = run.is_dir()
        cfg = prepare_run(cfg, run, resume, force, steps)
    accelerator.wait_for_everyone()
    if not is_main:  # the folder is the main process's now: reopen it as a resume does
        cfg = prepare_run(cfg, run, True, False)
    started = time.time()
    if frames is None:
        frames = read_video(cfg.video, start=cfg.data.start, stride=cfg.data.stride,
                            n_frames=cfg.data.n_frames, size=cfg.data.size)
    if is_main:
        try:
            components, vgt = build_models(cfg, run, frames)  # writes the tiny preset's base/
        except AplaError:
            if not resume:  # a config the models refuse (e.g. a size the patch does not divide)
                shutil.rmtree(run, ignore_errors=True)
                if existed:
                    run.mkdir()
            raise
    accelerator.wait_for_everyone()
    if not is_main:
        components, vgt = build_models(cfg, run, frames)

    # -- models, data, optimisers ----------------------------------------------------
    unet = components.unet
    unet.gradient_checkpointing = cfg.model.gradient_checkpointing
    components.text_encoder.to(device)
    components.codec.to(device)
    generator = torch.Generator().manual_seed(cfg.train.seed + accelerator.process_index)
    torch.manual_seed(cfg.train.seed + accelerator.process_index)  # global RNG too (restored on resume)
    with torch.no_grad():
        latents = encode_video(components.codec, frames, generator=generator).to(device)
        cond = encode_prompts(components, [cfg.prompt])
        uncond = encode_prompts(components, [""])
    n_frames = latents.shape[2]
    trainable = _trainable(unet, cfg.model.trainable)
    groups = [{"params": list(trainable.values()), "lr": cfg.train.lr}]
    if vgt is not None:
        groups.append({"params": list(vgt.parameters()), "lr": cfg.train.vgt_lr})
    opt = torch.optim.AdamW(groups, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    disc = dopt = None
    if cfg.loss.l_adv > 0:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.train.seed + 1)
            disc = Discriminator(cfg.disc, components.codec.latent_channels, n_frames)
        dopt = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=cfg.disc.betas)
    lpips_model = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights).to(device) if cfg.loss.l_per > 0 else None

    start_step = 0
    optimizers = {"generator": opt} | ({"discriminator": dopt} if dopt is not None else {})
    last = ckpt.latest_checkpoint(run) if resume else None
    if is_main:
        ckpt.remove_partials(run)  # a checkpoint half-written by a killed run is never used
    if last is not None:
        apply_checkpoint(components, vgt, last, cfg.model.trainable)
        start_step, restored = ckpt.load_training_state(last, optimizers, disc, generator,
                                                        accelerator.process_index)
        state = ckpt.read_state(last)
        scaler_state = state.get("loss_scaler")
        if accelerator.scaler is not None and scaler_state:
            accelerator.scaler.load_state_dict(scaler_state)
        if not restored:  # written by fewer processes: a fresh, step-dependent stream
            generator.manual_seed(cfg.train.seed + accelerator.process_index + 7919 * start_step)
            torch.manual_seed(cfg.train.seed + accelerator.process_index + 7919 * start_step)
        saved_by = int(state.get("processes", 1))
        log(f"resumed from {last.relative_to(run)} (step {start_step})"
            + ("" if saved_by >= accelerator.num_processes else
               f"; it was written by {saved_by} process(es), so the random streams of the other "
               f"{accelerator.num_processes - saved_by} start afresh"))
    elif resume:
        log("no checkpoint yet: starting from step 0")
    if is_main:
        _truncate_metrics(run / "metrics.jsonl", start_step)

    unet, opt = accelerator.prepare(unet, opt)
    if vgt is not None:
        vgt = accelerator.prepare(vgt)
    if disc is not None:
        disc, dopt = accelerator.prepare(disc, dopt)
    unet.train()
    abar = torch.from_numpy(alphas_cumprod(components.scheduler)).float().to(device)
    n_train = components.scheduler.num_train_timesteps
    source_frames = frames_to_tensor(frames).to(device)

    def save(step: int, other_ranks_rng: dict[str, torch.Tensor]) -> Path:
        return ckpt.save_checkpoint(run, step, unet_trainable=trainable,
                                    vgt=accelerator.unwrap_model(vgt) if vgt is not None else None,
                                    disc=accelerator.unwrap_model(disc) if disc is not None else None,
                                    optimizers=optimizers, generator=generator,
                                    config=cfg.to_dict(), keep=cfg.train.keep_checkpoints,
                                    loss_scaler=accelerator.scaler.state_dict() if accelerator.scaler else None,
                                    other_ranks_rng=other_ranks_rng,
                                    processes=accelerator.num_processes)

    def record_step(record: dict) -> None:
        """One metrics line, then a checkpoint when one is due (skipped steps included)."""
        done = record["step"]
        due = done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
        # the collective first: a failing write on the main process must not leave the others
        # waiting in it
        other_ranks_rng = _other_ranks_rng(accelerator, generator) if due else {}
        if metrics_file is not None:
            try:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            except OSError as err:
                raise AplaError(f"could not write {run / 'metrics.jsonl'}: {err.strerror or err}") from err
        if due and is_main:
            save(done, other_ranks_rng)

    def skip_step(step: int, t: torch.Tensor, what: str) -> None:
        """--skip-nonfinite: no update; the step is logged as skipped (counted in summary.json)."""
        opt.zero_grad(set_to_none=True)
        record_step({"step": step + 1, "t": int(t), "skipped": what})

    # -- the loop --------------------------------------------------------------------
    params = list(trainable.values()) + (list(vgt.parameters()) if vgt is not None else [])
    bar = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
               disable=not (progress and is_main), desc="train", dynamic_ncols=True)
    metrics_file = open(run / "metrics.jsonl", "a", encoding="utf-8") if is_main else None
    try:
        for step in bar:
            t = torch.randint(cfg.train.t_min, n_train, (1,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            t_dev = t.to(device)
            a = abar[t_dev].view(-1, 1, 1, 1, 1)
            z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
            use_per = lpips_model is not None and int(t) < cfg.loss.per_t_max
            per_idx = torch.randperm(n_frames, generator=generator)[:cfg.loss.per_frames] if use_per else None
            adv_on = disc is not None and step >= cfg.loss.adv_start
            with accelerator.autocast():
                eps_theta = unet(z_t, t_dev, cond)
                delta = vgt(z_t, t_dev, latents) if (vgt is not None and cfg.vgt.source) else \
                    (vgt(z_t, t_dev) if vgt is not None else torch.zeros_like(eps_theta))
                eps_hat = eps_theta + delta
                terms = hyper_terms(eps_hat.float(), noise)
                loss = cfg.loss.l_mse * terms["mse"] + cfg.loss.l_l1 * terms["l1"]
                if use_per:
                    idx = per_idx.to(device)
                    x0 = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
                    decoded = components.codec.decode(x0[0].permute(1, 0, 2, 3)[idx].float())
                    terms["per"] = perceptual_loss(lpips_model, decoded, source_frames[idx])
                    loss = loss + cfg.loss.l_per * terms["per"]
                if adv_on:
                    terms["adv"] = generator_adv_loss(disc, eps_hat.float())
                    loss = loss + cfg.loss.l_adv * terms["adv"]
            if not _finite_everywhere(accelerator, loss):
                if cfg.train.skip_nonfinite:
                    skip_step(step, t, "loss")
                    continue
                _nonfinite(run, step, "loss")
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.grad_clip)
            # with fp16 loss scaling, overflowing gradients are expected: the scaler skips the step
            if accelerator.scaler is None and not torch.isfinite(torch.as_tensor(grad_norm)):
                opt.zero_grad(set_to_none=True)
                if cfg.train.skip_nonfinite:
                    skip_step(step, t, "gradient")
                    continue
                _nonfinite(run, step, "gradient")
            opt.step()
            overflow = accelerator.scaler is not None and accelerator.optimizer_step_was_skipped
            opt.zero_grad(set_to_none=True)
            if adv_on:
                dopt.zero_grad(set_to_none=True)  # L_adv's backward also reached D: drop it
                with accelerator.autocast():
                    d_loss = discriminator_loss(disc, noise, eps_hat.detach().float())
                accelerator.backward(d_loss)
                dopt.step()
                dopt.zero_grad(set_to_none=True)
                terms["disc"] = d_loss.detach()
            record = {"step": step + 1, "t": int(t), "loss": float(loss.detach())}
            if overflow:  # fp16: the loss scaler found inf/NaN gradients and skipped the update
                record["scaler_skipped"] = True
            record.update({k: float(v.detach()) for k, v in terms.items()})
            record["ratio"] = float(perturbation_ratio(delta.float(), eps_theta.float()))
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "mse", "l1", "per", "adv", "ratio")
                             if k in record})
            record_step(record)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    accelerator.wait_for_everyone()
    train_s = time.time() - started
    if not is_main:
        return {}

    # -- after training: inversion, sample, summary ------------------------------------
    unet_eval = accelerator.unwrap_model(unet).eval()
    vgt_eval = accelerator.unwrap_model(vgt).eval() if vgt is not None else None
    # invert the posterior mean (what the exported VAE encoder and `apla-rt invert` compute);
    # training above used posterior samples, as the spec says
    mean_latents = encode_video(components.codec, frames).to(device)
    summary = finish_run(cfg, run, components, unet_eval, vgt_eval, mean_latents, frames, cond, uncond, log)
    records = _read_metrics(run / "metrics.jsonl")  # resumed runs included
    history = [r["loss"] for r in records if "loss" in r]
    skipped = sum(1 for r in records if "skipped" in r)
    summary.update(steps=cfg.train.steps, skipped_nonfinite=skipped, train_seconds=round(train_s, 1),
                   loss_first10=_mean(history[:10]), loss_last10=_mean(history[-10:]))
    _write_json(run / "summary.json", summary)
    return summary


def finish_run(cfg, run, components, unet, vgt, latents, frames, cond, uncond, log) -> dict:
    """Invert the training clip, sample the training prompt from it, measure the PSNR."""
    source = latents if cfg.vgt.source else None
    start = ddim_invert(unet, vgt, latents, uncond, components.scheduler, cfg.sample.inversion_steps, source)
    np_start = start.float().cpu().numpy()
    atomic.write_file(run / "start_latent.npy", lambda p: np.save(p, np_start, allow_pickle=False), force=True)
    if source is not None:  # a VGT that reads the clean latent needs it at sampling time too
        np_source = source.float().cpu().numpy()
        atomic.write_file(run / "source_latent.npy", lambda p: np.save(p, np_source, allow_pickle=False),
                          force=True)
    if not cfg.sample.enabled:
        log("sample.enabled is false: no sample video written")
        return {"prompt": cfg.prompt, "frames": int(latents.shape[2])}
    text = torch.cat([uncond, cond])
    sample = ddim_sample(unet, vgt, start, text, components.scheduler, cfg.sample.steps,
                         cfg.sample.guidance, source)
    video = decode_video(components.codec, sample)
    for ext in ("mp4", "gif"):
        write_video(run / f"sample.{ext}", video, fps=cfg.sample.fps, force=True)
    recon_psnr = psnr(video, frames)
    autoencoder_psnr = psnr(decode_video(components.codec, latents), frames)
    log(f"reconstruction PSNR vs the source frames: {recon_psnr:.2f} dB "
        f"(autoencoder alone: {autoencoder_psnr:.2f} dB)")
    return {"reconstruction_psnr_db": round(recon_psnr, 3),
            "autoencoder_psnr_db": round(autoencoder_psnr, 3),
            "frames": int(video.shape[0]), "size": int(video.shape[1]),
            "prompt": cfg.prompt, "guidance": cfg.sample.guidance, "sample_steps": cfg.sample.steps}


def _silent(message: str) -> None:
    pass


def _other_ranks_rng(accelerator, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The RNG states of the processes other than the main one, for its checkpoint, so that
    each process resumes its own random stream. A collective: every process must call it;
    the main process gets ``{"torch_cpu.rank1": ..., "data.rank1": ..., ...}``."""
    if accelerator.num_processes == 1:
        return {}
    global_state, data_state = torch.get_rng_state(), generator.get_state()
    mine = torch.cat([global_state, data_state]).to(accelerator.device)
    everyone = accelerator.gather(mine).cpu().view(accelerator.num_processes, -1)
    n = global_state.numel()
    states: dict[str, torch.Tensor] = {}
    for rank in range(1, accelerator.num_processes):
        global_key, data_key = ckpt.rank_rng_keys(rank)
        states[global_key], states[data_key] = everyone[rank, :n].clone(), everyone[rank, n:].clone()
    return states


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process: all of them must skip or stop together
    (a lone process leaving the step would hang the others in the gradient all-reduce)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.gather(bad)
    return not bool(bad.max() > 0)


def _nonfinite(run: Path, step: int, what: str) -> None:
    last = ckpt.latest_checkpoint(run)
    where = f"last good checkpoint: {last.relative_to(run)}" if last else "no checkpoint was written yet"
    raise NonFiniteError(f"non-finite {what} at step {step + 1}; training stopped ({where}); "
                         f"resume with --resume, or pass --skip-nonfinite to skip such steps")


def _read_metrics(path: Path) -> list[dict]:
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    keep = [json.dumps(r) for r in _read_metrics(path) if r["step"] <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep), force=True)




def _mean(xs: list[float]) -> float | None:
    return round(float(np.mean(xs)), 6) if xs else None
