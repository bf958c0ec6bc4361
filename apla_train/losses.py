"""Hyper-Loss terms, the LPIPS perceptual loss and the adversarial losses (spec section 4).

With eps the true noise and eps_hat = eps_theta + delta:

* L_MSE = mean((eps_hat - eps)^2), L_L1 = mean(|eps_hat - eps|)          (``hyper_terms``)
* L_per = LPIPS(x0_hat, x) on frames in [-1, 1]                          (``perceptual_loss``)
* L_D   = mean softplus(-D(eps)) + mean softplus(D(sg(eps_hat)))          (``discriminator_loss``)
* L_adv = mean softplus(-D(eps_hat))                                     (``generator_adv_loss``)
* r     = ||delta|| / ||eps_theta||, logged                              (``perturbation_ratio``)

LPIPS never downloads: the linear heads ship with the ``lpips`` package, and the backbone's
torchvision weights are read from a given file or torch hub's cache, or a ``ConfigError``
says where to put them.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from apla_rt.errors import ConfigError

# LPIPS net name -> (torchvision builder, weights enum name); the file name comes from the enum's url
_BACKBONES = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}


# ---------------------------------------------------------------------------------------
# Hyper-Loss regression terms


def hyper_terms(eps_hat: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"mse": mean((eps_hat - eps)^2), "l1": mean(|eps_hat - eps|)}."""
    return {"mse": F.mse_loss(eps_hat, eps), "l1": F.l1_loss(eps_hat, eps)}


def perturbation_ratio(delta: torch.Tensor, eps_theta: torch.Tensor) -> torch.Tensor:
    """||delta|| / ||eps_theta|| (Frobenius), detached; 0 / 0 gives 0, x / 0 stays finite."""
    num = torch.linalg.vector_norm(delta.detach().float())
    den = torch.linalg.vector_norm(eps_theta.detach().float())
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------------
# Perceptual (LPIPS)


def lpips_backbone_file(net: str) -> str:
    """torchvision's checkpoint file name for the LPIPS backbone ``net`` (alex, vgg, squeeze)."""
    import torchvision

    if net not in _BACKBONES:
        raise ConfigError(f"loss.lpips_net must be one of {', '.join(_BACKBONES)} (got {net!r})")
    enum = getattr(torchvision.models, _BACKBONES[net][1])
    return enum.IMAGENET1K_V1.url.rsplit("/", 1)[-1]


def default_lpips_weights(net: str) -> str:
    """Where torch hub keeps the backbone: ``<torch.hub.get_dir()>/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", lpips_backbone_file(net))


def _features_state(checkpoint: dict, path: str, net: str) -> dict[str, torch.Tensor]:
    """The ``features.*`` part of a torchvision classifier state dict, prefix removed.

    A state dict of ``model.features`` alone (keys ``0.weight``...) is accepted as is.
    """
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"LPIPS {net} backbone weights at {path} are not a state dict")
    if any(k.startswith("features.") for k in checkpoint):
        return {k[len("features."):]: v for k, v in checkpoint.items() if k.startswith("features.")}
    return dict(checkpoint)


@functools.lru_cache(maxsize=None)
def _frozen_lpips_class() -> type:
    """lpips.LPIPS whose ``train()`` keeps eval mode (no dropout) whatever its parent's mode.

    Built lazily: importing lpips pulls in torchvision and takes seconds.
    """
    import lpips

    class FrozenLPIPS(lpips.LPIPS):
        def train(self, mode: bool = True) -> "FrozenLPIPS":
            return super().train(False)

    return FrozenLPIPS


def load_lpips(net: str = "alex", weights: Optional[str] = None) -> nn.Module:
    """A frozen LPIPS module with the package's linear heads and torchvision's backbone.

    The backbone is read (strictly, ``weights_only=True``) from ``weights`` or, if None, from
    torch hub's cache. Nothing is downloaded; a missing file is a ``ConfigError``. The module
    is in eval mode with ``requires_grad=False`` everywhere, but differentiable w.r.t. inputs.
    """
    if net not in _BACKBONES:
        raise ConfigError(f"loss.lpips_net must be one of {', '.join(_BACKBONES)} (got {net!r})")
    path = weights if weights is not None else default_lpips_weights(net)
    if not os.path.isfile(path):
        raise ConfigError(f"the LPIPS {net} backbone weights are not available offline: expected {path}; "
                          f"set loss.lpips_weights=PATH or disable the term with --set loss.l_per=0")
    with warnings.catch_warnings():
        # lpips asks torchvision for a random backbone with the deprecated `pretrained=False`
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        model = _frozen_lpips_class()(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _check_heads_loaded(model, net)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"LPIPS {net} backbone weights at {path} cannot be read: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    features = _features_state(checkpoint, path, net)
    # lpips splits torchvision's `features` into slices that keep the original indices
    index_to_slice = {name: slice_name
                      for slice_name, block in model.net.named_children()
                      for name, _ in block.named_children()}
    remapped = {}
    for key, value in features.items():
        index, _, rest = key.partition(".")
        if index not in index_to_slice:
            raise ConfigError(f"LPIPS {net} backbone weights at {path} do not match torchvision's "
                              f"{_BACKBONES[net][0]}: unexpected key features.{key}")
        remapped[f"{index_to_slice[index]}.{index}.{rest}"] = value
    try:
        model.net.load_state_dict(remapped, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"LPIPS {net} backbone weights at {path} do not match torchvision's "
                          f"{_BACKBONES[net][0]}: {' '.join(str(err).split())[:300]}") from err
    model.requires_grad_(False)
    return model.eval()


def _check_heads_loaded(model: nn.Module, net: str) -> None:
    """lpips loads its heads with strict=False; make sure every head really came from the file."""
    import inspect

    import lpips

    heads_path = os.path.join(os.path.dirname(inspect.getfile(lpips.LPIPS)), "weights", "v0.1", f"{net}.pth")
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    state = model.state_dict()
    wanted = {k for k in state if k.startswith("lin") and not k.startswith("lins.")}
    if set(heads) != wanted or any(not torch.equal(state[k], heads[k]) for k in wanted):
        raise RuntimeError(f"lpips package heads for {net} did not load from {heads_path}")


def perceptual_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS distance between image batches x, y of shape (n, 3, H, W) in [-1, 1]."""
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"perceptual_loss expects two (n, 3, H, W) batches, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    return model(x, y, normalize=False).mean()


# ---------------------------------------------------------------------------------------
# Adversarial (non-saturating, logits)

Disc = Callable[[torch.Tensor], torch.Tensor]


def discriminator_loss(D: Disc, eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(eps)) + mean softplus(D(eps_hat.detach())): real = eps, fake = eps_hat."""
    return F.softplus(-D(eps)).mean() + F.softplus(D(eps_hat.detach())).mean()


def generator_adv_loss(D: Disc, eps_hat: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(eps_hat)). Gradients also land on D's parameters: zero them (or
    ``D.requires_grad_(False)``) before the discriminator step."""
    return F.softplus(-D(eps_hat)).mean()
