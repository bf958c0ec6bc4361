"""One-shot APLA training: one video, one prompt (spec section 4).

Each step: one t for the whole clip, noise, z_t = add_noise(z0); eps_hat = UNet3D(z_t, t, c)
+ VGT(z_t, t); Hyper-Loss (MSE + L1 + LPIPS on decoded clean estimates) + the adversarial
term; then a discriminator step (real = eps, fake = eps_hat). Runs under Hugging Face
Accelerate (``accelerate launch`` for several GPUs); fp32 on CPU, fp16 autocast on CUDA.
After the last step the run inverts its clip and samples its prompt (``finish``). The run
folder's layout is in ``run.py``.

``train`` reads as the recipe: open the run folder, build the models, set up, restore, loop,
finish. Everything the steps share is one ``Session``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from apla_rt.folder import atomic
from apla_rt.errors import AplaError, InputError, NonFiniteError
from apla_rt.sampling.schedule import alphas_cumprod
from apla_rt.sampling.solvers import inverted_timestep
from apla_rt.media.video import psnr, write_video

from . import checkpoint as ckpt
from .components import Components, build_tiny, encode_prompts, load_pretrained, save_components
from .config import AplaConfig
from .discriminator import Discriminator
from .losses import (discriminator_loss, generator_adv_loss, hyper_terms, load_lpips, perceptual_loss,
                     perturbation_ratio)
from .run import MetricsLog, check_inputs, loss_summary, prepare_run, read_clip, truncate_metrics, write_json
from .sampling import ddim_invert, ddim_sample, decode_video, encode_video, frames_to_tensor
from .unet3d import is_trainable_name
from .vgt import build_vgt


def train(cfg: AplaConfig, run: Path, *, resume: bool = False, force: bool = False,
          log: Callable[[str], None] = print, progress: bool = True, steps: int | None = None) -> dict:
    """Train (or with ``resume`` continue, optionally to ``steps``) the run in ``run``."""
    run = Path(run)
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:  # one voice: the others' messages would repeat the main one's
        log = _silent
    cfg, frames, existed = open_run(accelerator, cfg, run, resume, force, steps)
    started = time.time()
    if frames is None:
        frames = read_clip(cfg)
    components, vgt = build_run_models(accelerator, cfg, run, frames, undo=None if resume else existed)
    session = Session.setup(cfg, run, accelerator, components, vgt, frames)
    start_step = restore(session, resume, log)
    session.prepare()
    train_loop(session, start_step, progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    return finish(session, time.time() - started, log)


# ---------------------------------------------------------------------------------------
# Launcher and run folder


def make_accelerator(cfg: AplaConfig):
    """Hugging Face Accelerate for this process (one of several under ``accelerate launch``).
    Created first, so that only the main process sets the run folder up."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available())


def _mixed_precision(cfg: AplaConfig) -> str:
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    return "fp16" if torch.cuda.is_available() else "no"


def open_run(accelerator, cfg: AplaConfig, run: Path, resume: bool, force: bool,
             steps: int | None) -> tuple[AplaConfig, np.ndarray | None, bool]:
    """The main process checks a new run's inputs and creates (or reopens) the folder; the
    others wait for it, then reopen it as a resume does. Returns the run's config, the clip's
    frames where they were read already, and whether the folder existed before."""
    frames, existed = None, False
    if accelerator.is_main_process:
        frames = None if resume else check_inputs(cfg)
        existed = run.is_dir()
        cfg = prepare_run(cfg, run, resume, force, steps)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # the folder is the main process's now
        cfg = prepare_run(cfg, run, True, False)
    return cfg, frames, existed


def build_run_models(accelerator, cfg: AplaConfig, run: Path, frames: np.ndarray,
                     undo: bool | None) -> tuple[Components, torch.nn.Module | None]:
    """``build_models`` on the main process first (it writes the tiny preset's base/), then on
    the others. A config the models refuse (e.g. a size the patch does not divide) removes a
    new run folder again: ``undo`` says whether the folder existed before (None: a resume,
    nothing to undo)."""
    if accelerator.is_main_process:
        try:
            models = build_models(cfg, run, frames)
        except AplaError:
            if undo is not None:
                shutil.rmtree(run, ignore_errors=True)
                if undo:
                    run.mkdir()
            raise
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        models = build_models(cfg, run, frames)
    return models


# ---------------------------------------------------------------------------------------
# Models of a run (also used by export and the benchmarks)


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


# ---------------------------------------------------------------------------------------
# The session: what the steps share


@dataclass(eq=False)
class Session:
    """One process's training state: models, the encoded clip and prompts, optimisers, the
    data generator (timesteps, noise, LPIPS frames)."""

    cfg: AplaConfig
    run: Path
    accelerator: object
    components: Components
    unet: torch.nn.Module
    vgt: torch.nn.Module | None
    disc: torch.nn.Module | None
    frames: np.ndarray
    latents: torch.Tensor  # posterior samples of the clip, as the spec trains on
    cond: torch.Tensor
    uncond: torch.Tensor
    trainable: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    dopt: torch.optim.Optimizer | None
    lpips: torch.nn.Module | None
    generator: torch.Generator
    abar: torch.Tensor | None = None
    source_frames: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt} | ({"discriminator": self.dopt} if self.dopt is not None else {})

    @classmethod
    def setup(cls, cfg: AplaConfig, run: Path, accelerator, components: Components,
              vgt: torch.nn.Module | None, frames: np.ndarray) -> "Session":
        """Models on the device, the clip and prompts encoded, optimisers and the
        discriminator built, every random stream seeded per process."""
        device, rank = accelerator.device, accelerator.process_index
        components.unet.gradient_checkpointing = cfg.model.gradient_checkpointing
        components.text_encoder.to(device)
        components.codec.to(device)
        generator = torch.Generator().manual_seed(cfg.train.seed + rank)
        torch.manual_seed(cfg.train.seed + rank)  # global RNG too (restored on resume)
        with torch.no_grad():
            latents = encode_video(components.codec, frames, generator=generator).to(device)
            cond = encode_prompts(components, [cfg.prompt])
            uncond = encode_prompts(components, [""])
        trainable = _trainable(components.unet, cfg.model.trainable)
        groups = [{"params": list(trainable.values()), "lr": cfg.train.lr}]
        if vgt is not None:
            groups.append({"params": list(vgt.parameters()), "lr": cfg.train.vgt_lr})
        opt = torch.optim.AdamW(groups, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
        disc = dopt = None
        if cfg.loss.l_adv > 0:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.train.seed + 1)
                disc = Discriminator(cfg.disc, components.codec.latent_channels, latents.shape[2])
            dopt = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=cfg.disc.betas)
        lpips = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights).to(device) if cfg.loss.l_per > 0 else None
        return cls(cfg, run, accelerator, components, components.unet, vgt, disc, frames, latents, cond,
                   uncond, trainable, opt, dopt, lpips, generator)

    def prepare(self) -> None:
        """Hand the models and optimisers to Accelerate (after a restore: it loads into the
        bare ones) and put the UNet in training mode."""
        acc = self.accelerator
        self.unet, self.opt = acc.prepare(self.unet, self.opt)
        if self.vgt is not None:
            self.vgt = acc.prepare(self.vgt)
        if self.disc is not None:
            self.disc, self.dopt = acc.prepare(self.disc, self.dopt)
        self.unet.train()
        self.abar = torch.from_numpy(alphas_cumprod(self.components.scheduler)).float().to(self.device)
        self.source_frames = frames_to_tensor(self.frames).to(self.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the generator step updates (clipped together)."""
        return list(self.trainable.values()) + (list(self.vgt.parameters()) if self.vgt is not None else [])

    def adversarial_at(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.loss.adv_start


# ---------------------------------------------------------------------------------------
# Checkpoints and random streams


def restore(s: Session, resume: bool, log: Callable[[str], None]) -> int:
    """With ``resume``, load the last checkpoint's weights, optimisers, loss scaler and this
    process's random streams; returns the step to start from. Leftovers of a killed save are
    removed and ``metrics.jsonl`` is cut back to the restored step."""
    last = ckpt.latest_checkpoint(s.run) if resume else None
    if s.is_main:
        ckpt.remove_partials(s.run)  # a checkpoint half-written by a killed run is never used
    start_step = 0
    if last is not None:
        start_step = _restore_from(s, last, log)
    elif resume:
        log("no checkpoint yet: starting from step 0")
    if s.is_main:
        truncate_metrics(s.run / "metrics.jsonl", start_step)
    return start_step


def _restore_from(s: Session, last: Path, log: Callable[[str], None]) -> int:
    acc, rank = s.accelerator, s.accelerator.process_index
    apply_checkpoint(s.components, s.vgt, last, s.cfg.model.trainable)
    start_step, restored = ckpt.load_training_state(last, s.optimizers, s.disc, s.generator, rank)
    state = ckpt.read_state(last)
    scaler_state = state.get("loss_scaler")
    if acc.scaler is not None and scaler_state:
        acc.scaler.load_state_dict(scaler_state)
    if not restored:  # written by fewer processes: a fresh, step-dependent stream
        s.generator.manual_seed(s.cfg.train.seed + rank + 7919 * start_step)
        torch.manual_seed(s.cfg.train.seed + rank + 7919 * start_step)
    saved_by = int(state.get("processes", 1))
    log(f"resumed from {last.relative_to(s.run)} (step {start_step})"
        + ("" if saved_by >= acc.num_processes else
           f"; it was written by {saved_by} process(es), so the random streams of the other "
           f"{acc.num_processes - saved_by} start afresh"))
    return start_step


def save(s: Session, step: int, other_ranks_rng: dict[str, torch.Tensor]) -> Path:
    """The main process's checkpoint of ``step``, with every process's random streams."""
    acc = s.accelerator
    return ckpt.save_checkpoint(s.run, step, unet_trainable=s.trainable,
                                vgt=acc.unwrap_model(s.vgt) if s.vgt is not None else None,
                                disc=acc.unwrap_model(s.disc) if s.disc is not None else None,
                                optimizers=s.optimizers, generator=s.generator,
                                config=s.cfg.to_dict(), keep=s.cfg.train.keep_checkpoints,
                                loss_scaler=acc.scaler.state_dict() if acc.scaler else None,
                                other_ranks_rng=other_ranks_rng, processes=acc.num_processes)


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


# ---------------------------------------------------------------------------------------
# The loop


def train_loop(s: Session, start_step: int, progress: bool) -> None:
    """Steps ``start_step`` .. ``train.steps``: a generator step, then from ``loss.adv_start`` a
    discriminator step; one metrics line per step and the checkpoints that fall due."""
    from tqdm.auto import tqdm

    cfg = s.cfg
    bar = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
               disable=not (progress and s.is_main), desc="train", dynamic_ncols=True)
    metrics = MetricsLog(s.run / "metrics.jsonl") if s.is_main else None
    try:
        for step in bar:
            out = generator_step(s, step)
            if out.skipped is None and s.adversarial_at(step):
                out.terms["disc"] = discriminator_step(s, out.noise, out.eps_hat)
            record = out.record(step)
            if out.skipped is None:
                bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "mse", "l1", "per", "adv", "ratio")
                                 if k in record})
            record_step(s, metrics, record)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()


@dataclass
class GeneratorStep:
    """What one generator step produced (``skipped``: "loss" or "gradient" when non-finite
    values skipped its update under ``train.skip_nonfinite``)."""

    t: int
    noise: torch.Tensor
    eps_hat: torch.Tensor
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    ratio: torch.Tensor | None = None
    overflow: bool = False  # fp16: the loss scaler found inf/NaN gradients and skipped the update
    skipped: str | None = None

    def record(self, step: int) -> dict:
        """The step's metrics line."""
        if self.skipped is not None:
            return {"step": step + 1, "t": self.t, "skipped": self.skipped}
        record = {"step": step + 1, "t": self.t, "loss": float(self.loss.detach())}
        if self.overflow:
            record["scaler_skipped"] = True
        record.update({k: float(v.detach()) for k, v in self.terms.items()})
        record["ratio"] = float(self.ratio)
        return record


def generator_step(s: Session, step: int) -> GeneratorStep:
    """Noise the clip at one random t, predict eps_hat = eps_theta + delta, and update the
    UNet's trainable set and the VGT on the Hyper-Loss (+ the adversarial term)."""
    cfg, device, gen = s.cfg, s.device, s.generator
    t = torch.randint(cfg.train.t_min, s.components.scheduler.num_train_timesteps, (1,), generator=gen)
    noise = torch.randn(s.latents.shape, generator=gen).to(device)
    t_dev = t.to(device)
    a = s.abar[t_dev].view(-1, 1, 1, 1, 1)
    z_t = a.sqrt() * s.latents + (1 - a).sqrt() * noise
    use_per = s.lpips is not None and int(t) < cfg.loss.per_t_max
    per_idx = torch.randperm(s.latents.shape[2], generator=gen)[:cfg.loss.per_frames] if use_per else None
    with s.accelerator.autocast():
        eps_theta = s.unet(z_t, t_dev, s.cond)
        delta = _vgt_delta(s, z_t, t_dev, eps_theta)
        eps_hat = eps_theta + delta
        terms = hyper_terms(eps_hat.float(), noise)
        loss = cfg.loss.l_mse * terms["mse"] + cfg.loss.l_l1 * terms["l1"]
        if use_per:
            idx = per_idx.to(device)
            x0 = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
            decoded = s.components.codec.decode(x0[0].permute(1, 0, 2, 3)[idx].float())
            terms["per"] = perceptual_loss(s.lpips, decoded, s.source_frames[idx])
            loss = loss + cfg.loss.l_per * terms["per"]
        if s.adversarial_at(step):
            terms["adv"] = generator_adv_loss(s.disc, eps_hat.float())
            loss = loss + cfg.loss.l_adv * terms["adv"]
    out = GeneratorStep(int(t), noise, eps_hat, loss, terms)
    out.skipped = _update_generator(s, loss, step)
    if out.skipped is None:
        out.overflow = s.accelerator.scaler is not None and s.accelerator.optimizer_step_was_skipped
        out.ratio = perturbation_ratio(delta.float(), eps_theta.float())
    return out


def _vgt_delta(s: Session, z_t: torch.Tensor, t: torch.Tensor, eps_theta: torch.Tensor) -> torch.Tensor:
    if s.vgt is None:
        return torch.zeros_like(eps_theta)
    return s.vgt(z_t, t, s.latents) if s.cfg.vgt.source else s.vgt(z_t, t)


def _update_generator(s: Session, loss: torch.Tensor, step: int) -> str | None:
    """Backward, clip and step; a non-finite loss or gradient stops the run, or with
    ``train.skip_nonfinite`` drops the update and returns what was non-finite."""
    acc, opt = s.accelerator, s.opt
    if not _finite_everywhere(acc, loss):
        opt.zero_grad(set_to_none=True)
        return _nonfinite(s, step, "loss")
    acc.backward(loss)
    grad_norm = acc.clip_grad_norm_(s.parameters(), s.cfg.train.grad_clip)
    # with fp16 loss scaling, overflowing gradients are expected: the scaler skips the step
    if acc.scaler is None and not torch.isfinite(torch.as_tensor(grad_norm)):
        opt.zero_grad(set_to_none=True)
        return _nonfinite(s, step, "gradient")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return None


def discriminator_step(s: Session, noise: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """One update of D: real = the drawn noise eps, fake = eps_hat. Returns D's loss."""
    acc = s.accelerator
    s.dopt.zero_grad(set_to_none=True)  # L_adv's backward also reached D: drop it
    with acc.autocast():
        d_loss = discriminator_loss(s.disc, noise, eps_hat.detach().float())
    acc.backward(d_loss)
    s.dopt.step()
    s.dopt.zero_grad(set_to_none=True)
    return d_loss.detach()


def record_step(s: Session, metrics: MetricsLog | None, record: dict) -> None:
    """One metrics line, then a checkpoint when one is due (skipped steps included)."""
    done = record["step"]
    due = done % s.cfg.train.checkpoint_every == 0 or done == s.cfg.train.steps
    # the collective first: a failing write on the main process must not leave the others
    # waiting in it
    other_ranks_rng = _other_ranks_rng(s.accelerator, s.generator) if due else {}
    if metrics is not None:
        metrics.write(record)
    if due and s.is_main:
        save(s, done, other_ranks_rng)


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process: all of them must skip or stop together
    (a lone process leaving the step would hang the others in the gradient all-reduce)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.gather(bad)
    return not bool(bad.max() > 0)


def _nonfinite(s: Session, step: int, what: str) -> str:
    """``what`` under ``train.skip_nonfinite``; otherwise the run stops here."""
    if s.cfg.train.skip_nonfinite:
        return what
    last = ckpt.latest_checkpoint(s.run)
    where = f"last good checkpoint: {last.relative_to(s.run)}" if last else "no checkpoint was written yet"
    raise NonFiniteError(f"non-finite {what} at step {step + 1}; training stopped ({where}); "
                         f"resume with --resume, or pass --skip-nonfinite to skip such steps")


# ---------------------------------------------------------------------------------------
# After training: inversion, sample, summary


def finish(s: Session, train_s: float, log: Callable[[str], None]) -> dict:
    """Invert the clip, sample the prompt from the inverted latent, write ``summary.json``."""
    cfg, acc = s.cfg, s.accelerator
    inversion_steps, sample_steps = cfg.sample.final_step_counts(s.device.type)
    log(f"after training: {inversion_steps} inversion and "
        f"{sample_steps if cfg.sample.enabled else 0} sampling steps "
        f"(sample.final_steps={cfg.sample.final_steps} on {s.device.type})")
    unet = acc.unwrap_model(s.unet).eval()
    vgt = acc.unwrap_model(s.vgt).eval() if s.vgt is not None else None
    # invert the posterior mean (what the exported VAE encoder and `apla-rt invert` compute);
    # training used posterior samples, as the spec says
    mean_latents = encode_video(s.components.codec, s.frames).to(s.device)
    start = invert_clip(s, unet, vgt, mean_latents, inversion_steps)
    start_timestep = inverted_timestep(s.components.scheduler, inversion_steps)
    summary = {"prompt": cfg.prompt, "frames": int(mean_latents.shape[2])}
    if cfg.sample.enabled:
        summary = sample_clip(s, unet, vgt, start, mean_latents, sample_steps, log, start_timestep)
    else:
        log("sample.enabled is false: no sample video written")
    summary["inversion_steps"] = inversion_steps
    summary["start_timestep"] = start_timestep  # the timestep start_latent.npy belongs to
    losses = loss_summary(s.run / "metrics.jsonl")
    summary.update(steps=cfg.train.steps, skipped_nonfinite=losses["skipped_nonfinite"],
                   train_seconds=round(train_s, 1), loss_first10=losses["loss_first10"],
                   loss_last10=losses["loss_last10"])
    write_json(s.run / "summary.json", summary)
    return summary


def invert_clip(s: Session, unet, vgt, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM inversion of the clip's clean latents with the empty prompt, written as
    ``start_latent.npy`` (and ``source_latent.npy`` for a VGT that reads the clean latent)."""
    source = latents if s.cfg.vgt.source else None
    start = ddim_invert(unet, vgt, latents, s.uncond, s.components.scheduler, steps, source)
    _save_npy(s.run / "start_latent.npy", start)
    if source is not None:  # that VGT needs it at sampling time too
        _save_npy(s.run / "source_latent.npy", source)
    return start


def sample_clip(s: Session, unet, vgt, start: torch.Tensor, latents: torch.Tensor, steps: int,
                log: Callable[[str], None], start_timestep: int) -> dict:
    """Sample the training prompt from ``start`` (belonging to ``start_timestep``) with the
    reference sampler and the run's ``sample.scheduler``, write
    ``sample.mp4``/``.gif`` and measure the PSNR against the source frames."""
    cfg = s.cfg
    source = latents if cfg.vgt.source else None
    text = torch.cat([s.uncond, s.cond])
    sample = ddim_sample(unet, vgt, start, text, s.components.scheduler, steps, cfg.sample.guidance, source,
                         solver=cfg.sample.scheduler, start_timestep=start_timestep)
    video = decode_video(s.components.codec, sample)
    for ext in ("mp4", "gif"):
        write_video(s.run / f"sample.{ext}", video, fps=cfg.sample.fps, force=True)
    recon_psnr = psnr(video, s.frames)
    autoencoder_psnr = psnr(decode_video(s.components.codec, latents), s.frames)
    log(f"reconstruction PSNR vs the source frames: {recon_psnr:.2f} dB "
        f"(autoencoder alone: {autoencoder_psnr:.2f} dB)")
    return {"reconstruction_psnr_db": round(recon_psnr, 3),
            "autoencoder_psnr_db": round(autoencoder_psnr, 3),
            "frames": int(video.shape[0]), "size": int(video.shape[1]),
            "prompt": cfg.prompt, "guidance": cfg.sample.guidance, "sample_steps": steps,
            "scheduler": cfg.sample.scheduler}


def _save_npy(path: Path, x: torch.Tensor) -> None:
    array = x.float().cpu().numpy()
    atomic.write_file(path, lambda p: np.save(p, array, allow_pickle=False), force=True)


def _silent(message: str) -> None:
    pass
