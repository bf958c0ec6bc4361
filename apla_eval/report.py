"""Assemble every available measure of one video into a report: rows for a table, and JSON.

``evaluate`` takes frames (and optionally an embedder, a prompt and an equally sampled
source clip) and returns a ``Report``; it never reads files. What is unavailable is a row
whose value is ``unavailable`` and whose note says why, and a ``None`` in ``metrics``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import metrics as M

UNAVAILABLE = "unavailable"


@dataclass
class Row:
    metric: str
    value: str
    note: str = ""


@dataclass
class Report:
    video: dict[str, Any]
    embedder: str | None
    metrics: dict[str, Any]
    embedder_is_clip: bool = False
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: Any, note: str = "") -> None:
        self.rows.append(Row(metric, _fmt(value), note))

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"video": self.video, "embedder": self.embedder,
                          "embedder_is_clip": self.embedder_is_clip, "metrics": self.metrics,
                          "notes": self.notes,
                          "table": [r.__dict__ for r in self.rows]})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def table(self) -> str:
        """Header lines (video, embedder), then an aligned metric / value / note table."""
        v = self.video
        head = [f"video: {v.get('path', '(frames)')} ({v['frames']} frames, {v['width']}x{v['height']})",
                f"embedder: {self.embedder or UNAVAILABLE}"]
        rows = [Row("metric", "value", "note"), *self.rows]
        w0 = max(len(r.metric) for r in rows)
        w1 = max(len(r.value) for r in rows)
        lines = [f"{r.metric:<{w0}}  {r.value:>{w1}}  {r.note}".rstrip() for r in rows]
        lines.insert(1, "-" * (w0 + w1 + 40))
        return "\n".join(head + [""] + lines + [f"note: {n}" for n in self.notes])


def _fmt(value: Any) -> str:
    if value is None:
        return UNAVAILABLE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def jsonable(x: Any, keep: Callable[[str], bool] = lambda key: True) -> Any:
    """``x`` as plain JSON data, mapping keys that ``keep`` refuses left out. JSON has no
    inf/nan: infinity becomes the string "inf", nan becomes null."""
    if isinstance(x, dict):
        return {k: jsonable(v, keep) for k, v in x.items() if keep(k)}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, keep) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def evaluate(frames: np.ndarray, *, embedder: Any = None, embedder_error: str | None = None,
             prompt: str | None = None, source: np.ndarray | None = None,
             source_note: str = "", lpips: bool = True) -> Report:
    """Measure ``frames`` (uint8 (f >= 2, h, w, 3)).

    ``embedder``: a ``ClipEmbedder`` or ``OfflineEmbedder`` (None: consistency unavailable,
    ``embedder_error`` says why). ``source``: a clip sampled exactly like ``frames``
    (PSNR/SSIM/LPIPS); ``source_note`` says how it was sampled.
    """
    f, h, w, _ = frames.shape
    name = getattr(embedder, "name", None)
    report = Report(video={"frames": f, "height": h, "width": w}, embedder=name, metrics={},
                    embedder_is_clip=bool(getattr(embedder, "is_clip", False)))
    m = report.metrics

    # motion first: a static video makes the consistency numbers meaningless
    flows = M.consecutive_flows(frames)  # once, for motion and warp error
    mo = M.motion(frames, flows)
    static = mo["is_static"]
    static_warning = "STATIC video: near-perfect consistency here is meaningless" if static else ""

    # embeddings: frame consistency and CLIP score
    m["frame_consistency"], m["clip_score"] = None, None
    if embedder is None:
        for label in ("frame consistency (all pairs)", "frame consistency (consecutive)"):
            report.add(label, None, embedder_error or "no embedder")
        report.add("CLIP score", None, "needs a CLIP embedder (--clip PATH)")
    else:
        is_clip = report.embedder_is_clip
        if not is_clip:
            report.notes.append(f"frame consistency uses {name}: its values are not comparable "
                                "with CLIP-based numbers")
        emb = embedder.embed_images(frames)
        fc = m["frame_consistency"] = M.frame_consistency(emb)
        kind = "CLIP" if is_clip else "EfficientNet-Lite0"
        report.add("frame consistency (all pairs)", fc["all_pairs"],
                   static_warning or f"mean {kind} cosine over frames i != j; higher = more consistent")
        report.add("frame consistency (consecutive)", fc["consecutive"],
                   static_warning or f"mean {kind} cosine of frames i, i+1")
        if not getattr(embedder, "has_text", False):
            report.add("CLIP score", None, "the offline embedder has no text tower; pass --clip PATH")
        elif not prompt:
            report.add("CLIP score", None, "no prompt given (--prompt TEXT)")
        else:
            m["clip_score"] = M.clip_score(emb, embedder.embed_text(prompt))
            report.add("CLIP score", m["clip_score"], f"100 x mean cosine(frame, {prompt!r})")

    # optical flow: warp error and motion
    m["warp_error"] = M.warp_error(frames, flows)
    report.add("warp error", m["warp_error"],
               "Farneback flow, frame i+1 warped onto i, mean |diff| in [0, 1]; lower = more consistent")
    m["motion"] = mo
    report.add("motion: mean flow (px/frame)", mo["mean_flow_px"], "Farneback flow magnitude")
    report.add("motion: p99 flow (px/frame)", mo["p99_flow_px"],
               f"static when below {M.STATIC_FLOW_PX:g} px/frame")
    report.add("motion: mean |frame diff|", mo["mean_abs_diff"], "consecutive frames, [0, 1] units")
    report.add("static", static, "frozen video: do not trust its consistency" if static else "the video moves")
    if static:
        report.notes.append("the video is static (frozen); its frame consistency says nothing "
                            "about temporal quality")

    # against the source clip
    if source is None:
        for key, label in (("psnr", "PSNR vs source (dB)"), ("ssim", "SSIM vs source"),
                           ("lpips", "LPIPS vs source")):
            m[key] = None
            report.add(label, None, "no source clip (--source CLIP)")
        return report
    m["psnr"] = M.psnr(frames, source)
    report.add("PSNR vs source (dB)", m["psnr"]["mean"], source_note)
    if min(h, w) >= 7:
        m["ssim"] = M.ssim(frames, source)
        report.add("SSIM vs source", m["ssim"]["mean"], source_note)
    else:
        m["ssim"] = None
        report.add("SSIM vs source", None, "frames smaller than SSIM's 7 x 7 window")
    if lpips:
        from .embedders import lpips_to_source

        m["lpips"], lp_note = lpips_to_source(frames, source)
        report.add("LPIPS vs source", m["lpips"]["mean"] if m["lpips"] else None,
                   f"{lp_note}; lower = closer" if m["lpips"] else lp_note)
    else:
        m["lpips"] = None
        report.add("LPIPS vs source", None, "not requested")
    return report
