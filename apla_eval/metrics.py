"""Video metrics without learned weights: pure functions over NumPy arrays.

Frames are uint8 ``(f, h, w, 3)`` RGB, as ``apla_rt.media.video.read_video`` returns them.
Embeddings are float ``(f, d)``. Wrong shapes or dtypes are caller bugs (``ValueError``);
user-facing checks (a video too short, a source of another size) belong to the CLI.

What each number means (APLA.md section 6):

* ``frame_consistency``: mean cosine of frame embeddings over all pairs i != j (the
  Tune-A-Video / APLA "FCI") and over consecutive pairs. Higher is more consistent, but a
  frozen video scores ~1: always read it next to ``motion``.
* ``clip_score``: 100 x mean cosine(frame embedding, prompt embedding).
* ``warp_error``: frame i+1 warped back onto frame i with Farneback optical flow; mean
  absolute error in [0, 1] units over in-bounds pixels. Lower is more consistent.
* ``motion``: how much the video moves; ``is_static`` flags frozen videos.
* ``psnr`` / ``ssim``: against a source clip sampled the same way (same frames, same size).
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from apla_rt.media.video import psnr as video_psnr

# Farneback parameters (OpenCV's argument names). Four pyramid levels at scale 0.5 with a
# 15 px window follow motions of a few tens of pixels per frame at 512 x 512.
FARNEBACK_PYR_SCALE, FARNEBACK_LEVELS, FARNEBACK_WINSIZE = 0.5, 4, 15
FARNEBACK_ITERATIONS, FARNEBACK_POLY_N, FARNEBACK_POLY_SIGMA = 3, 5, 1.2

# A video is static when, averaged over consecutive pairs, the 99th percentile of the
# optical-flow magnitude is below this many pixels per frame: nothing in it moves by even
# one pixel, so its frame consistency says nothing about temporal quality. The percentile
# (not the mean) keeps a small moving object on a still background "moving". Measured:
# a frozen frame re-encoded as JPEG or with Gaussian noise (sigma 5/255) gives 0.3-0.5 px
# (sigma 8/255: 0.85); car-turn.mp4 (24 frames, stride 2) gives 2-9 px from 64 x 64 to
# 480 x 480. Noise does not shrink with the frame size but motion does: at generation sizes
# (256-512 px) the two are far apart; below ~128 px slow motion can read as static.
STATIC_FLOW_PX = 1.0


def check_video(frames: np.ndarray, name: str = "frames", min_frames: int = 1) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames, got {frames.shape[0]}")
    return frames


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- embeddings ---------------------------------------------------------------------------

def frame_consistency(emb: np.ndarray) -> dict[str, float]:
    """Mean cosine similarity of frame embeddings ``(f, d)``, f >= 2.

    ``all_pairs`` averages over every ordered pair i != j, ``consecutive`` over (i, i+1).
    """
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"frame embeddings must be (f >= 2, d), got {emb.shape}")
    e = _normalise(emb)
    gram = e @ e.T
    f = e.shape[0]
    all_pairs = (gram.sum() - np.trace(gram)) / (f * (f - 1))
    consecutive = np.mean(np.sum(e[:-1] * e[1:], axis=1))
    return {"all_pairs": float(all_pairs), "consecutive": float(consecutive)}


def clip_score(frame_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """100 x mean over frames of cosine(frame embedding ``(f, d)``, text embedding ``(d,)``)."""
    frame_emb, text_emb = np.asarray(frame_emb), np.asarray(text_emb).reshape(-1)
    if frame_emb.ndim != 2 or frame_emb.shape[1] != text_emb.shape[0]:
        raise ValueError(f"embedding shapes {frame_emb.shape} and {text_emb.shape} do not match")
    return float(100.0 * np.mean(_normalise(frame_emb) @ _normalise(text_emb)))


# --- optical flow -------------------------------------------------------------------------

def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Farneback flow ``(h, w, 2)`` (dx, dy) from RGB frame ``a`` to frame ``b``.

    ``a[y, x] ~ b[y + dy, x + dx]``: a point at (x, y) in ``a`` moved by (dx, dy) in ``b``.
    """
    flow = cv2.calcOpticalFlowFarneback(
        _gray(a), _gray(b), None, pyr_scale=FARNEBACK_PYR_SCALE, levels=FARNEBACK_LEVELS,  # type: ignore[call-overload]
        winsize=FARNEBACK_WINSIZE, iterations=FARNEBACK_ITERATIONS, poly_n=FARNEBACK_POLY_N,
        poly_sigma=FARNEBACK_POLY_SIGMA, flags=0)
    return np.asarray(flow)


def warp_back(b: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample frame ``b`` at ``(x + dx, y + dy)``: ``b`` warped onto the previous frame.

    Returns the warped frame (float32, same units as ``b``) and a boolean mask of the
    pixels whose sample point lies inside ``b``.
    """
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = xs + flow[..., 0], ys + flow[..., 1]
    warped = cv2.remap(b.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    valid = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return warped, valid


def consecutive_flows(frames: np.ndarray) -> list[np.ndarray]:
    """``optical_flow(frame i, frame i+1)`` for every consecutive pair."""
    frames = check_video(frames, min_frames=2)
    return [optical_flow(a, b) for a, b in zip(frames[:-1], frames[1:])]


def warp_error(frames: np.ndarray, flows: list[np.ndarray] | None = None) -> float:
    """Mean over consecutive pairs of |warp(frame i+1 -> i) - frame i| in [0, 1] units.

    Only in-bounds pixels count; a pair with none (cannot happen for sane flow) is skipped.
    ``flows``: ``consecutive_flows(frames)`` where already computed.
    """
    frames = check_video(frames, min_frames=2)
    flows = flows if flows is not None else consecutive_flows(frames)
    errors = []
    for a, b, flow in zip(frames[:-1], frames[1:], flows):
        warped, valid = warp_back(b, flow)
        if valid.any():
            diff = np.abs(warped - a.astype(np.float32))[valid]
            errors.append(float(diff.mean()) / 255.0)
    return float(np.mean(errors)) if errors else float("nan")


def motion(frames: np.ndarray, flows: list[np.ndarray] | None = None) -> dict[str, float | bool]:
    """How much a video moves, between consecutive frames.

    ``mean_flow_px``: mean Farneback flow magnitude (pixels per frame);
    ``p99_flow_px``: mean over pairs of the 99th percentile of that magnitude;
    ``mean_abs_diff``: mean |frame i+1 - frame i| in [0, 1] units;
    ``is_static``: ``p99_flow_px < STATIC_FLOW_PX`` (see there).
    ``flows``: ``consecutive_flows(frames)`` where already computed.
    """
    frames = check_video(frames, min_frames=2)
    flows = flows if flows is not None else consecutive_flows(frames)
    mean_mag, p99_mag, diffs = [], [], []
    for a, b, flow in zip(frames[:-1], frames[1:], flows):
        mag = np.linalg.norm(flow, axis=-1)
        mean_mag.append(float(mag.mean()))
        p99_mag.append(float(np.percentile(mag, 99)))
        diffs.append(float(np.abs(b.astype(np.float32) - a.astype(np.float32)).mean()) / 255.0)
    p99 = float(np.mean(p99_mag))
    return {
        "mean_flow_px": float(np.mean(mean_mag)),
        "p99_flow_px": p99,
        "mean_abs_diff": float(np.mean(diffs)),
        "is_static": bool(p99 < STATIC_FLOW_PX),
        "static_threshold_px": STATIC_FLOW_PX,
    }


# --- against a source clip ----------------------------------------------------------------

def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = check_video(a, "video"), check_video(b, "source")
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and source {b.shape} must be sampled the same way")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> dict[str, list[float] | float]:
    """PSNR in dB per frame (peak 255) and their mean; identical frames give ``inf``."""
    a, b = _check_pair(a, b)
    per_frame = [video_psnr(x, y) for x, y in zip(a, b)]
    return {"per_frame": per_frame, "mean": float(np.mean(per_frame))}


def ssim(a: np.ndarray, b: np.ndarray) -> dict[str, list[float] | float]:
    """SSIM per frame (skimage, colour channels averaged, data range 255) and their mean."""
    a, b = _check_pair(a, b)
    per_frame = [float(structural_similarity(x, y, channel_axis=-1, data_range=255))
                 for x, y in zip(a, b)]
    return {"per_frame": per_frame, "mean": float(np.mean(per_frame))}
