"""One-shot training at library level, on man-skiing.mp4 with the tiny preset (spec section 4).

Most tests read the session's shared tiny run (``tiny_run`` in conftest: 6 steps, checkpoints
at 3 and 6, adversarial term from step 3, 4 frames at 32 px); the rest train a few steps
of their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from apla_rt.errors import ConfigError
from apla_rt.media.video import psnr, read_video
from apla_train import checkpoint as ckpt
from apla_train.cli import main
from apla_train.components import build_tiny, encode_prompts, load_pretrained, save_components
from apla_train.config import AplaConfig, from_dict, merge, tiny_preset
from apla_train.discriminator import Discriminator
from apla_train.losses import hyper_terms
from apla_train.sampling import encode_video
from apla_train.train import _trainable, apply_checkpoint, build_models, train
from apla_train.unet3d import is_trainable_name

FRAMES, SIZE = 4, 32


def tiny_cfg(video: Path, **sections) -> AplaConfig:
    """The tiny preset at 4 frames x 32 px, 1 sampling and 1 inversion step, plus ``sections``."""
    data = merge(tiny_preset(), {"video": str(video), "prompt": "a man is skiing",
                                 "data": {"n_frames": FRAMES, "size": SIZE},
                                 "sample": {"steps": 1, "inversion_steps": 1}})
    return from_dict(merge(data, sections)).validate()


def quiet_train(cfg: AplaConfig, run: Path, **kw) -> dict:
    return train(cfg, run, progress=False, log=lambda m: None, **kw)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_config(run: Path, **model) -> AplaConfig:
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    return from_dict(merge(cfg.to_dict(), {"model": model})) if model else cfg


def tav_names(unet) -> set[str]:
    return {n for n, _ in unet.named_parameters() if is_trainable_name(n, "tav")}


def checkpoint_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(path / name))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------
# The shared run: folder contents, metrics, perturbation


def test_run_folder_contents(tiny_run, skiing):
    run, _ = tiny_run
    cfg = run_config(run)
    assert cfg.to_dict() == json.loads((run / "config.json").read_text())
    assert (cfg.train.steps, cfg.data.n_frames, cfg.data.size, cfg.model.preset) == (6, FRAMES, SIZE, "tiny")

    found = ckpt.list_checkpoints(run)
    assert [s for s, _ in found] == [3, 6]
    assert not list((run / "checkpoints").glob(".*"))  # no partial checkpoint left behind
    for step, path in found:
        names = {p.name for p in path.iterdir()}
        assert {"model.safetensors", "disc.safetensors", "optim.safetensors", "optim.json",
                "rng.safetensors", "state.json"} <= names
        state = ckpt.read_state(path)
        assert state["step"] == step and state["config"] == cfg.to_dict()

    start = np.load(run / "start_latent.npy")
    assert start.shape == (1, 4, FRAMES, SIZE // 4, SIZE // 4) and start.dtype == np.float32
    assert np.isfinite(start).all() and start.std() > 0.1

    source = read_video(skiing, stride=2, n_frames=FRAMES, size=SIZE)
    for ext in ("mp4", "gif"):
        video = read_video(run / f"sample.{ext}")
        assert video.shape == (FRAMES, SIZE, SIZE, 3), ext

    summary = json.loads((run / "summary.json").read_text())
    assert (summary["frames"], summary["size"], summary["steps"]) == (FRAMES, SIZE, 6)
    # the reconstruction through inversion + sampling is close to the autoencoder's own
    assert 15 < summary["reconstruction_psnr_db"] <= summary["autoencoder_psnr_db"] + 1
    # the PSNR is the sample's: recomputed from the written (lossy) gif, within a few dB
    assert abs(psnr(read_video(run / "sample.gif"), source) - summary["reconstruction_psnr_db"]) < 3
    assert summary["loss_first10"] == pytest.approx(np.mean([r["loss"] for r in metrics(run)]), abs=1e-5)


def test_metrics_log_every_term_and_the_ratio(tiny_run):
    run, _ = tiny_run
    cfg = run_config(run)
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        adv_on = r["step"] > cfg.loss.adv_start  # the term starts at (0-based) step adv_start
        assert set(r) == {"step", "t", "loss", "mse", "l1", "ratio"} | ({"adv", "disc"} if adv_on else set())
        assert 0 <= r["t"] < 1000 and all(math.isfinite(v) for v in r.values())
        expected = r["mse"] + r["l1"] + (cfg.loss.l_adv * r["adv"] if adv_on else 0.0)
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["l1"] ** 2 <= r["mse"] + 1e-6  # mean|x|^2 <= mean x^2
    # the perturbation is exactly 0 at initialisation and non-zero once the VGT has trained
    assert records[0]["ratio"] == 0.0
    assert all(r["ratio"] > 1e-4 for r in records[1:])
    assert records[-1]["ratio"] < 1.0  # "tiny" next to the UNet's noise


def test_perturbation_is_exactly_zero_at_init(tiny_run, skiing):
    run, _ = tiny_run
    cfg = run_config(run)
    components, vgt = build_models(cfg, run)
    latents = encode_video(components.codec, read_video(skiing, stride=2, n_frames=FRAMES, size=SIZE))
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        for t in (0, 500, 999):
            delta = vgt(z_t, torch.tensor([t]))
            assert delta.shape == latents.shape and torch.equal(delta, torch.zeros_like(delta))


# ---------------------------------------------------------------------------------------
# Gradients: only the trainable subset and the VGT


def test_only_trainable_subset_and_vgt_get_gradients(tiny_run, skiing):
    run, _ = tiny_run
    cfg = run_config(run, trainable="tav")
    components, vgt = build_models(cfg, run)
    unet = components.unet.train()
    trainable = _trainable(unet, "tav")
    assert set(trainable) == tav_names(unet)
    frames = read_video(skiing, stride=2, n_frames=FRAMES, size=SIZE)
    latents = encode_video(components.codec, frames)
    cond = encode_prompts(components, [cfg.prompt])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([400])

    def backward():
        for p in list(unet.parameters()) + list(vgt.parameters()):
            p.grad = None
        z_t = 0.6 * latents + 0.8 * noise
        eps_hat = unet(z_t, t, cond) + vgt(z_t, t)
        terms = hyper_terms(eps_hat, noise)
        (terms["mse"] + terms["l1"]).backward()

    backward()
    frozen = [(n, p) for n, p in unet.named_parameters() if n not in trainable]
    assert frozen and all(p.grad is None and not p.requires_grad for _, p in frozen)
    frozen_parts = list(components.text_encoder.parameters()) + list(components.codec.parameters())
    assert all(p.grad is None for p in frozen_parts)
    assert all(p.grad is not None for p in trainable.values())
    nonzero = {n for n, p in trainable.items() if p.grad.abs().sum() > 0}
    # at init attn_temp's output projection is zero, so only it (not q/k/v) gets a gradient
    assert nonzero == {n for n in trainable if "attn_temp" not in n or ".to_out." in n}
    # likewise the VGT: only its zero last layer receives a gradient at step 0
    last = {id(p) for p in vgt.last_layer().parameters()}
    assert all((p.grad.abs().sum() > 0) == (id(p) in last) for p in vgt.parameters())

    # once the zero layers are not zero any more (as after one step), everything trainable learns
    with torch.no_grad():
        for p in list(vgt.last_layer().parameters()) + [p for n, p in trainable.items() if ".to_out." in n]:
            p.normal_(0.0, 0.02, generator=g)
    backward()
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vgt.parameters())
    assert all(p.grad is None for _, p in frozen)


def test_discriminator_step_sees_only_its_own_gradients(skiing, tmp_path, monkeypatch):
    """L_adv's backward also reaches D's parameters; the D step must start from clean grads,
    or D would be trained partly to call eps_hat real."""
    import apla_train.train as train_module

    stale = []
    real_loss = train_module.discriminator_loss

    def checked(disc, eps, eps_hat):
        stale.append(max((float(p.grad.abs().max()) for p in disc.parameters() if p.grad is not None),
                         default=0.0))
        return real_loss(disc, eps, eps_hat)

    monkeypatch.setattr(train_module, "discriminator_loss", checked)
    quiet_train(tiny_cfg(skiing, vgt={"kind": "none"}, train={"steps": 2}, loss={"adv_start": 0}), tmp_path / "run")
    assert "adv" in metrics(tmp_path / "run")[0]
    assert stale == [0.0, 0.0]


# ---------------------------------------------------------------------------------------
# Every VGT variant trains


@pytest.mark.parametrize("kind,mask", [("hyper", "causal"), ("hyper", "none"), ("pure", "causal"),
                                       ("pure", "none"), ("none", "causal")])
def test_every_vgt_variant_trains(kind, mask, skiing, tmp_path):
    cfg = tiny_cfg(skiing, vgt={"kind": kind, "mask": mask}, model={"trainable": "tav"},
                   train={"steps": 2}, loss={"adv_start": 1})
    summary = quiet_train(cfg, tmp_path / "run")
    records = metrics(tmp_path / "run")
    assert len(records) == 2 and "adv" in records[1] and summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in records)
    model = checkpoint_tensors(ckpt.latest_checkpoint(tmp_path / "run"), "model.safetensors")
    components, vgt = build_models(cfg, tmp_path / "run")
    assert {k[5:] for k in model if k.startswith("unet.")} == tav_names(components.unet)
    vgt_keys = {k[4:] for k in model if k.startswith("vgt.")}
    if kind == "none":
        assert vgt is None and not vgt_keys
        assert all(r["ratio"] == 0.0 for r in records)  # plain Tune-A-Video
    else:
        assert vgt_keys == set(vgt.state_dict())
        assert records[0]["ratio"] == 0.0 and records[1]["ratio"] > 0
        assert torch.count_nonzero(model[f"vgt.{'head.out' if kind == 'hyper' else 'head'}.weight"]) > 0


# ---------------------------------------------------------------------------------------
# Checkpoints and resume


def test_checkpoint_round_trip_is_exact(tiny_run, tmp_path):
    """Load the shared run's step-6 checkpoint into fresh models and optimisers, save it again:
    the same tensors bit for bit; load that into another fresh set: the same state."""
    run, _ = tiny_run
    cfg = run_config(run)
    source = ckpt.latest_checkpoint(run)

    def fresh():
        components, vgt = build_models(cfg, run)
        trainable = _trainable(components.unet, cfg.model.trainable)
        opt = torch.optim.AdamW([{"params": list(trainable.values()), "lr": cfg.train.lr},
                                 {"params": list(vgt.parameters()), "lr": cfg.train.vgt_lr}],
                                betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
        disc = Discriminator(cfg.disc, 4, FRAMES)
        dopt = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=cfg.disc.betas)
        return components, vgt, trainable, {"generator": opt, "discriminator": dopt}, disc, torch.Generator()

    components, vgt, trainable, opts, disc, gen = fresh()
    apply_checkpoint(components, vgt, source, cfg.model.trainable)
    assert ckpt.load_training_state(source, opts, disc, gen) == (6, True)
    rng_saved = torch.get_rng_state()
    out = ckpt.save_checkpoint(tmp_path, 6, unet_trainable=trainable, vgt=vgt, disc=disc, optimizers=opts,
                               generator=gen, config=cfg.to_dict(), keep=2)
    for name in ("model.safetensors", "disc.safetensors", "optim.safetensors", "rng.safetensors"):
        assert_same_tensors(checkpoint_tensors(source, name), checkpoint_tensors(out, name))
    assert json.loads((out / "optim.json").read_text()) == json.loads((source / "optim.json").read_text())
    assert ckpt.read_state(out) == ckpt.read_state(source)

    components2, vgt2, trainable2, opts2, disc2, gen2 = fresh()
    torch.manual_seed(1234)  # scramble the global RNG: loading must restore it
    apply_checkpoint(components2, vgt2, out, cfg.model.trainable)
    ckpt.load_training_state(out, opts2, disc2, gen2)
    assert torch.equal(torch.get_rng_state(), rng_saved) and torch.equal(gen2.get_state(), gen.get_state())
    assert_same_tensors(components.unet.state_dict(), components2.unet.state_dict())
    assert_same_tensors(vgt.state_dict(), vgt2.state_dict())
    assert_same_tensors(disc.state_dict(), disc2.state_dict())
    for name in opts:
        a, b = opts[name].state_dict(), opts2[name].state_dict()
        assert a["param_groups"] == json.loads(json.dumps(b["param_groups"]))
        assert a["state"].keys() == b["state"].keys()
        for idx in a["state"]:
            assert_same_tensors(a["state"][idx], b["state"][idx])
    # the trained weights really differ from a fresh init (the round trip is not vacuous)
    init, _ = build_models(cfg, run)
    assert any(not torch.equal(p, init.unet.state_dict()[n]) for n, p in trainable.items())


def test_checkpoint_rng_states_per_process(tmp_path):
    """Each process restores its own RNG states; one the checkpoint lacks (written by fewer
    processes) is reported, and the main process's states are required."""
    from safetensors.torch import save_file

    from apla_rt.errors import IntegrityError

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    rank1 = torch.Generator().manual_seed(11)
    other = {"torch_cpu.rank1": torch.Generator().manual_seed(12).get_state(), "data.rank1": rank1.get_state()}
    path = ckpt.save_checkpoint(tmp_path / "two", 4, unet_trainable={"w": torch.ones(3)}, vgt=None, disc=None,
                                optimizers={"generator": opt}, generator=torch.Generator().manual_seed(10),
                                config={}, keep=2, other_ranks_rng=other, processes=2)
    assert ckpt.read_state(path)["processes"] == 2
    gen = torch.Generator()
    with torch.random.fork_rng():  # loading sets the global RNG: keep the session's as it was
        assert ckpt.load_training_state(path, {"generator": opt}, None, gen, rank=1) == (4, True)
        assert torch.equal(gen.get_state(), rank1.get_state())
        assert torch.equal(torch.get_rng_state(), other["torch_cpu.rank1"])
    assert ckpt.load_training_state(path, {"generator": opt}, None, gen, rank=2) == (4, False)
    save_file({"data": gen.get_state()}, str(path / "rng.safetensors"))  # the main process's half lost
    with pytest.raises(IntegrityError, match="lacks the random states"):
        ckpt.load_training_state(path, {"generator": opt}, None, gen)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_run, tiny_run_args, skiing, tmp_path, monkeypatch):
    """Interrupt a copy of the shared run right after its step-3 checkpoint, resume it with
    --resume: every step-6 tensor, the metrics and the sample equal the uninterrupted run's."""
    ref, _ = tiny_run
    run = tmp_path / "run"
    save = ckpt.save_checkpoint

    def save_then_interrupt(run_dir, step, **kw):
        path = save(run_dir, step, **kw)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_interrupt)
    result = CliRunner().invoke(main, [str(skiing), "--out", str(run), *tiny_run_args])
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3] and len(metrics(run)) == 3
    monkeypatch.undo()

    result = CliRunner().invoke(main, ["--out", str(run), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "resumed from checkpoints/step-00000003 (step 3)" in result.stderr

    a, b = ckpt.checkpoint_dir(ref, 6), ckpt.checkpoint_dir(run, 6)
    for name in ("model.safetensors", "disc.safetensors", "optim.safetensors"):
        assert_same_tensors(checkpoint_tensors(a, name), checkpoint_tensors(b, name))
    # both RNGs too: the data generator and torch's global one (seeded at the start of a run)
    assert_same_tensors(checkpoint_tensors(a, "rng.safetensors"), checkpoint_tensors(b, "rng.safetensors"))
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert np.array_equal(np.load(run / "start_latent.npy"), np.load(ref / "start_latent.npy"))
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    assert summary_a["reconstruction_psnr_db"] == summary_b["reconstruction_psnr_db"]


# ---------------------------------------------------------------------------------------
# Learning, the --pretrained path, LPIPS


def test_steps_after_training_are_logged_and_summarised(skiing, tmp_path):
    """sample.final_steps="auto" on a CPU takes at most CPU_FINAL_STEPS; the log and
    summary.json say which counts were used."""
    from apla_train.config import CPU_FINAL_STEPS

    if torch.cuda.is_available():
        pytest.skip("checks the CPU's counts; this machine trains on CUDA")
    lines: list[str] = []
    cfg = tiny_cfg(skiing, train={"steps": 1},
                   sample={"final_steps": "auto", "steps": CPU_FINAL_STEPS + 2, "inversion_steps": 12})
    summary = train(cfg, tmp_path / "run", progress=False, log=lines.append)
    assert (summary["inversion_steps"], summary["sample_steps"]) == (CPU_FINAL_STEPS, CPU_FINAL_STEPS)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["inversion_steps"] == CPU_FINAL_STEPS
    assert f"after training: {CPU_FINAL_STEPS} inversion and {CPU_FINAL_STEPS} sampling steps" in "\n".join(lines)
    saved = from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved.sample.final_steps == "auto" and saved.sample.steps == CPU_FINAL_STEPS + 2


def test_loss_falls_when_overfitting_four_frames(skiing, tmp_path):
    cfg = tiny_cfg(skiing, train={"steps": 30, "checkpoint_every": 30})
    summary = quiet_train(cfg, tmp_path / "run")
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert (summary["loss_first10"], summary["loss_last10"]) == (pytest.approx(first, abs=1e-5),
                                                                 pytest.approx(last, abs=1e-5))
    assert last < 0.7 * first, (first, last)  # about 0.5 on this machine


def test_save_components_folder_trains_through_pretrained(skiing, tmp_path):
    frames = read_video(skiing, stride=2, n_frames=FRAMES, size=SIZE)
    built = build_tiny(frames, patch=4, seed=7)
    folder = tmp_path / "tiny-sd"
    save_components(built, folder)
    loaded = load_pretrained(folder)
    state = loaded.unet.state_dict()
    assert_same_tensors({k: v for k, v in built.unet.state_dict().items() if "_temp." not in k},
                        {k: v for k, v in state.items() if "_temp." not in k})
    assert torch.equal(encode_video(built.codec, frames), encode_video(loaded.codec, frames))

    run = tmp_path / "run"
    args = [str(skiing), "--prompt", "a man is skiing", "--pretrained", str(folder), "--out", str(run),
            "--steps", "2", "--frames", str(FRAMES), "--size", str(SIZE), "--quiet",
            "--set", "loss.l_per=0", "--set", "sample.steps=1", "--set", "sample.inversion_steps=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cfg = run_config(run)
    assert (cfg.model.preset, cfg.model.pretrained, cfg.model.trainable) == ("sd", str(folder), "tav")
    assert cfg.vgt.dim == 256 and cfg.train.lr == 3e-5  # the SD defaults, not the tiny preset
    assert not (run / "base").exists()  # the frozen parts stay in the --pretrained folder
    model = checkpoint_tensors(ckpt.latest_checkpoint(run), "model.safetensors")
    assert {k[5:] for k in model if k.startswith("unet.")} == tav_names(loaded.unet)
    assert len(metrics(run)) == 2 and read_video(run / "sample.mp4").shape == (FRAMES, SIZE, SIZE, 3)


def test_perceptual_term_without_backbone_weights_is_a_clear_error(skiing, tmp_path, empty_torch_hub):
    cfg = tiny_cfg(skiing, loss={"l_per": 0.1}, train={"steps": 2})
    with pytest.raises(ConfigError) as info:
        quiet_train(cfg, tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and "not available offline" in message and "loss.lpips_weights" in message
    assert not any(empty_torch_hub.rglob("*.pth"))  # nothing was downloaded
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_perceptual_term_for_small_t_with_a_backbone_file(skiing, tmp_path, alexnet_weights):
    cfg = tiny_cfg(skiing, loss={"l_per": 0.1, "lpips_weights": str(alexnet_weights), "l_adv": 0.0},
                   train={"steps": 4})  # seed 33 draws t = 868, 572, 796, 458
    quiet_train(cfg, tmp_path / "run")
    records = metrics(tmp_path / "run")
    assert any(r["t"] < 500 for r in records) and any(r["t"] >= 500 for r in records)
    for r in records:
        assert ("per" in r) == (r["t"] < cfg.loss.per_t_max), r
        if "per" in r:
            assert math.isfinite(r["per"]) and r["per"] > 0
            assert r["loss"] == pytest.approx(r["mse"] + r["l1"] + 0.1 * r["per"], rel=1e-5)
