"""Hyper-Loss terms, the 1x1 discriminator, adversarial losses, offline LPIPS, ratio."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from apla_rt.errors import ConfigError
from apla_train.config import DiscriminatorConfig
from apla_train.discriminator import Discriminator
from apla_train.losses import (
    discriminator_loss,
    generator_adv_loss,
    hyper_terms,
    load_lpips,
    lpips_backbone_file,
    perceptual_loss,
    perturbation_ratio,
)

torch.set_num_threads(2)


def test_hyper_terms_match_manual():
    g = torch.Generator().manual_seed(0)
    eps_hat, eps = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    terms = hyper_terms(eps_hat, eps)
    assert set(terms) == {"mse", "l1"}
    diff = (eps_hat - eps).double()
    assert torch.allclose(terms["mse"].double(), (diff ** 2).sum() / diff.numel(), atol=1e-6)
    assert torch.allclose(terms["l1"].double(), diff.abs().sum() / diff.numel(), atol=1e-6)
    a = torch.tensor([1.0, -1.0, 3.0])
    t = hyper_terms(a, torch.zeros(3))
    assert t["mse"].item() == pytest.approx(11 / 3) and t["l1"].item() == pytest.approx(5 / 3)


def test_perturbation_ratio():
    delta, eps_theta = torch.full((2, 3), 1.0, requires_grad=True), torch.full((2, 3), 2.0)
    r = perturbation_ratio(delta, eps_theta)
    assert r.item() == pytest.approx(0.5) and not r.requires_grad
    assert perturbation_ratio(torch.zeros(4), torch.zeros(4)).item() == 0.0
    assert math.isfinite(perturbation_ratio(torch.ones(4), torch.zeros(4)).item())


@pytest.mark.parametrize("sn", [True, False])
def test_discriminator_shapes_and_1x1_only(sn):
    cfg = DiscriminatorConfig(hidden=(16, 32), spectral_norm=sn)
    D = Discriminator(cfg, latent_channels=4, n_frames=3)
    logits = D(torch.randn(2, 4, 3, 8, 8))
    assert logits.shape == (2, 1, 8, 8)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(12, 16), (16, 32), (32, 1)]
    assert all(c.kernel_size == (1, 1) for c in convs)
    assert not any(isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)) for m in D.modules())
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2
               for m in D.net if not isinstance(m, nn.Conv2d))
    assert all(hasattr(c, "parametrizations") == sn for c in convs)
    # 1x1 convs: each position is judged from its own temporal profile only
    x = torch.randn(1, 4, 3, 8, 8)
    x2 = x.clone()
    x2[..., 2, 5] += 1.0
    with torch.no_grad():
        D.eval()
        changed = (D(x) != D(x2))[0, 0]
    assert changed[2, 5] and changed.sum() == 1
    with pytest.raises(ConfigError, match="3 frames"):
        D(torch.randn(1, 4, 5, 8, 8))


class _Identity(nn.Module):
    """D(x) = x's first channel of frame 0: logits set by hand."""

    def forward(self, x):
        return x[:, :1, 0]


def test_adversarial_losses_hand_checked():
    D = _Identity()
    eps = torch.zeros(1, 4, 2, 2, 2)  # D(eps) = 0 -> softplus(0) = ln 2
    eps_hat = torch.ones(1, 4, 2, 2, 2, requires_grad=True)  # D(eps_hat) = 1
    ld = discriminator_loss(D, eps, eps_hat)
    assert ld.item() == pytest.approx(math.log(2) + math.log(1 + math.e), rel=1e-6)
    assert not ld.requires_grad  # fake branch is detached, real has no grad
    lg = generator_adv_loss(D, eps_hat)
    assert lg.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    lg.backward()
    assert eps_hat.grad is not None
    # d/dx softplus(-x) = -sigmoid(-x), averaged over the 4 logits that read eps_hat
    expected = -torch.sigmoid(torch.tensor(-1.0)) / 4
    assert torch.allclose(eps_hat.grad[:, 0, 0], expected.expand(1, 2, 2))
    assert eps_hat.grad[:, 1:].abs().sum() == 0

    real = Discriminator(DiscriminatorConfig(hidden=(8,)), 4, 2)
    eps_hat2 = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    discriminator_loss(real, torch.randn(1, 4, 2, 4, 4), eps_hat2).backward()
    assert eps_hat2.grad is None  # discriminator step never reaches the generator
    assert all(p.grad is not None for p in real.parameters())


@pytest.fixture
def hub_dir(empty_torch_hub):
    return empty_torch_hub


def test_load_lpips_missing_weights_is_a_clear_error(hub_dir):
    expected = os.path.join(str(hub_dir), "checkpoints", "alexnet-owt-7be5be79.pth")
    with pytest.raises(ConfigError) as info:
        load_lpips("alex", None)
    msg = str(info.value)
    assert "\n" not in msg and "alex" in msg and "not available offline" in msg
    assert expected in msg and "set loss.lpips_weights=PATH or disable the term with --set loss.l_per=0" in msg
    assert not os.path.exists(expected)  # nothing was downloaded
    with pytest.raises(ConfigError, match="nowhere.pth"):
        load_lpips("alex", str(hub_dir / "nowhere.pth"))
    with pytest.raises(ConfigError, match="vgg16-397923af.pth"):
        load_lpips("vgg", None)


def test_load_lpips_with_weights_file(hub_dir):
    import torchvision

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)
    path = hub_dir / "checkpoints" / lpips_backbone_file("alex")
    path.parent.mkdir(parents=True)
    torch.save(alexnet.state_dict(), path)

    model = load_lpips("alex", None)
    # the backbone is exactly the file's (not a random one)
    state = model.state_dict()
    for i in (0, 3, 6, 8, 10):
        key = next(k for k in state if k.startswith("net.") and k.endswith(f".{i}.weight"))
        assert torch.equal(state[key], alexnet.features[i].weight), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    parent = nn.Sequential(model).train()
    assert not model.training  # stays in eval (no dropout) inside a module put in train mode

    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert perceptual_loss(model, x, x.detach()).item() == pytest.approx(0.0, abs=1e-7)
    loss = perceptual_loss(model, x, y)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    del parent

    # an explicit path works too; a file of the wrong network is a clear error
    assert load_lpips("alex", str(path)) is not None
    bad = hub_dir / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match="do not match"):
        load_lpips("alex", str(bad))
