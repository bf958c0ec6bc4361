"""The ablation's outputs: matplotlib plots (Agg) and the markdown report of
``benchmarks/ablation.py`` (kept apart from the runs that produce the numbers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def mean_or_none(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from apla_rt.folder.atomic import write_file

    write_file(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"), force=True)
    plt.close(fig)


def plot_metrics(summary: dict, path: Path, has_clip: bool) -> None:
    import matplotlib.pyplot as plt

    panels = [("fc_all", "frame consistency, all pairs (higher = more consistent)"),
              ("fc_consecutive", "frame consistency, consecutive (higher)"),
              ("warp_error", "warp error (lower = more consistent)"),
              ("p99_flow_px", "motion: p99 flow, px/frame (0 = frozen)")]
    panels += [("clip_score", "CLIP score (higher)")] if has_clip else []
    panels += [("psnr", "PSNR vs source, dB (reconstruction only)"), ("ssim", "SSIM vs source (reconstruction only)")]
    methods = list(summary)
    cols = 3
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.4 * n_rows), squeeze=False)
    x = np.arange(len(methods))
    for ax, (key, title) in zip(axes.flat, panels):
        for j, (label, color) in enumerate((("reconstruction", "#4477aa"), ("text_to_video", "#ee6677"))):
            vals = [summary[m][label][key] for m in methods]
            if all(v is None for v in vals):
                continue
            heights = [np.nan if v is None else v for v in vals]
            ax.bar(x + (j - 0.5) * 0.38, heights, 0.38, label=label.replace("_", "-"), color=color)
        finite = [summary[m][lab][key] for m in methods for lab in ("reconstruction", "text_to_video")
                  if summary[m][lab][key] is not None]
        zoom = bool(finite) and key in ("fc_all", "fc_consecutive", "ssim", "psnr")
        if zoom:  # the differences are small: zoom in, and say so
            lo, hi = min(finite), max(finite)
            pad = max((hi - lo) * 0.3, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(title + (" [y zoomed]" if zoom else ""), fontsize=9)
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Ablation metrics per method (mean over clips; text-to-video: also over edited prompts)", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_ratio(results: list[dict], methods: tuple[str, ...], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in methods:
        # colour by head (pure / hyper), line style by variant (EN dotted, without adversarial dashed)
        color = "#4477aa" if name.startswith("pure") else "#ee6677"
        style = ":" if name.endswith("-EN") else "--" if name.endswith("-noadv") else "-"
        runs = [r for r in results if r["method"] == name]
        curves = np.array([v["ratio"] for r in runs for v in r["videos"]])
        if curves.size == 0 or not np.any(curves > 0):
            continue  # no VGT: delta is exactly zero
        t = runs[0]["videos"][0]["timesteps"]
        mean = curves.mean(0)
        left.plot(t, mean, marker="o", ms=3, label=name, color=color, linestyle=style)
        left.fill_between(t, curves.min(0), curves.max(0), color=color, alpha=0.06)
        train_curves = np.array([r["train"]["ratio_curve"] for r in runs])
        k = max(1, train_curves.shape[1] // 20)
        smooth = np.convolve(train_curves.mean(0), np.ones(k) / k, mode="valid")
        right.plot(np.arange(len(smooth)) + k, smooth, label=name, color=color, linestyle=style)
    left.set_xlim(1000, 0)
    left.set_yscale("log")
    left.set_xlabel("DDIM timestep t (denoising runs left to right)")
    left.set_ylabel("||delta|| / ||eps_theta||")
    left.set_title("Sampling (cf. paper Fig. 5b): mean over clips and prompts, band = min..max", fontsize=9)
    right.set_yscale("log")
    right.set_xlabel("training step")
    right.set_title("Training: ratio per step (moving average), mean over clips", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("VGT perturbation vs UNet noise; 'none' (Tune-A-Video) has delta = 0 and is not drawn", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_frames(results: list[dict], clip_name: str, methods: tuple[str, ...], path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = {r["method"]: r for r in results if r["clip"] == clip_name}
    rows = [("source clip", runs[methods[0]]["source_frames"])]
    rows += [(f"{m}: reconstruction", runs[m]["videos"][0]["_frames"]) for m in methods]
    if len(runs[methods[0]]["videos"]) > 1:
        edit = runs[methods[0]]["videos"][1]["prompt"]
        rows += [(f"{m}: edit", runs[m]["videos"][1]["_frames"]) for m in methods]
    else:
        edit = None
    f, h, w, _ = rows[0][1].shape
    scale = 40.0  # pixels per inch of figure
    fig, axes = plt.subplots(len(rows), 1, figsize=(f * w / scale + 1.8, len(rows) * h / scale + 0.5),
                             squeeze=False, layout="constrained")
    for ax, (label, frames) in zip(axes[:, 0], rows):
        ax.imshow(np.concatenate(list(frames), axis=1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    title = f"{clip_name}: frames left to right"
    fig.suptitle(title + (f"; edit = {edit!r}" if edit else ""), fontsize=9)
    _save_fig(fig, path)


# ---------------------------------------------------------------------------------------
# Report


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(meta: dict, summary: dict, source: dict, results: list[dict], tiny_defaults: dict) -> str:
    s, has_clip, tiny = meta["settings"], meta["embedder_is_clip"], meta["settings"]["preset"] == "tiny"
    steps = s["steps"] or "config default"
    lines = [
        "# Ablation: Tune-A-Video vs APLA's VGT variants", "",
        "Generated by `benchmarks/ablation.py`; every number is in [`ablation/results.json`](ablation/results.json).",
        "", "```", meta["command"], "```", "",
        f"* date: {meta['date']}", f"* machine: {meta['machine']}", f"* code: git {meta['git_commit']}",
        f"* total runtime: {meta['runtime_s'] / 60:.1f} min",
        f"* clips: {', '.join(s['clips'])} (`shared/data`) with their training prompts; {s['edits']} edited "
        "prompt(s) per clip from spec section 6",
        f"* models: {meta['model_note']}",
        f"* settings, identical for every method: {s['frames'] or 'default'} frames (stride 2 from frame 0) at "
        f"{s['size'] or 'default'} px, {steps} training steps, seed {s['seed']}, DDIM {s['sample_steps'] or 'default'}"
        f" steps (inversion and sampling), guidance {meta['guidance']}, torch threads {s['threads']}",
        f"* embedder for frame consistency: {meta['embedder']}"]
    if tiny:
        lines.append(f"* the tiny defaults ({tiny_defaults}) are sized so that 2 clips x 7 methods, each sampled for "
                     "5 prompts, fit in about 30 min on a 2-core CPU shared with other jobs; one torch thread, "
                     "because two threads on the busy machine made a VGT step 10-30x slower (oversubscription)")
    lines += ["", "## What these numbers can and cannot say", ""]
    if tiny:
        lines += [
            f"**These are tiny, randomly initialised models** (a ~1 M-parameter UNet, a random 2-layer text encoder "
            f"over bytes, a PCA patch autoencoder fitted to the clip) **trained on a CPU for {steps} steps.** They "
            "say nothing about Stable-Diffusion-scale quality and do not test the paper's claims; they show that "
            "every variant trains, samples and is measured by one pipeline. One seed per method, no error bars: "
            "differences in the third decimal are noise. In the tiny preset the perceptual term is off "
            "(`loss.l_per=0`), so the Hyper-Loss is MSE + L1.", ""]
    if not has_clip:
        lines += [
            "**Frame consistency uses the offline EfficientNet-Lite0 (ImageNet) embedder, NOT CLIP**: its values "
            "are not comparable with the paper's CLIP ViT-L/14 numbers, and there is no CLIP score (no text tower). "
            "Pass `--clip PATH` to a local CLIP folder for those.", ""]
    lines += [
        "**Text-to-video** here means Tune-A-Video's editing setting: the edited prompt sampled from the DDIM "
        "inversion of the training clip. Column *edit PSNR vs rec.* is the PSNR of each edited video against the "
        "same method's reconstruction (high = the edit changed little)."
        + (" The tiny text encoder is a random byte-level transformer: an edited prompt can change the output, "
           "but nothing can make the change mean 'mickey mouse' or 'on the beach', so these columns measure "
           "consistency under a perturbed condition, not editing." if tiny else ""), "",
        "*Static* counts videos whose p99 optical flow is below 1 px/frame (frozen videos score perfect "
        "consistency); below ~128 px slow motion can read as static, so check it against the source row.", "",
        "LPIPS is not reported (its backbone weights are not available offline).", "",
        "## Results (mean over clips; text-to-video also over the edited prompts)", ""]
    clip = ["CLIP"] if has_clip else []
    head = (["method", "rec FC all", "rec FC cons", "rec warp err ↓", "rec PSNR", "rec SSIM"]
            + [f"rec {c}" for c in clip]
            + ["t2v FC all", "t2v FC cons", "t2v warp err ↓"] + [f"t2v {c}" for c in clip]
            + ["edit PSNR vs rec.", "static (rec / t2v)"])
    rows = [["source clip", fmt(source["fc_all"]), fmt(source["fc_consecutive"]), fmt(source["warp_error"])]
            + ["-"] * (len(head) - 5) + [source["static"]]]
    for name, e in summary.items():
        r, t = e["reconstruction"], e["text_to_video"]
        rows.append([f"`{name}`", fmt(r["fc_all"]), fmt(r["fc_consecutive"]), fmt(r["warp_error"]), fmt(r["psnr"], 2),
                     fmt(r["ssim"])] + [fmt(r["clip_score"], 2)] * len(clip)
                    + [fmt(t["fc_all"]), fmt(t["fc_consecutive"]), fmt(t["warp_error"])]
                    + [fmt(t["clip_score"], 2)] * len(clip)
                    + [fmt(t["psnr_vs_reconstruction"], 2), f"{r['static']} / {t['static']}"])
    lines += _table(head, rows)
    lines += ["", "FC = frame consistency (mean cosine of frame embeddings; all pairs i != j, or consecutive "
              "frames); warp err = Farneback-flow warp error between consecutive frames in [0, 1]; PSNR (dB) "
              "and SSIM against the source frames, reconstruction only.", "",
              "![metrics per method](ablation/metrics.png)", "", *reading(summary, source, results), "",
              "## Training and the perturbation's size", ""]
    lines += _table(["method", "what", "train MSE (last 10 steps)", "ratio train (last 10)", "ratio sampling (mean)",
                     "train s / run"],
                    [[f"`{m['name']}`", m["description"], fmt(summary[m["name"]]["mse_train_last10"]),
                      fmt(summary[m["name"]]["ratio_train_last10"], 5), fmt(summary[m["name"]]["ratio_sampling_mean"], 5),
                      fmt(summary[m["name"]]["train_seconds"], 0)] for m in meta["methods"]])
    lines += ["", "ratio = ||delta|| / ||eps_theta|| (VGT output over the UNet's guided noise). The paper reports it "
              "staying tiny throughout denoising (its Fig. 5b). Train seconds include the run's own inversion and "
              "reconstruction sample.", "", "![ratio over denoising steps](ablation/ratio.png)", "",
              "## Per clip", ""]
    rows = []
    for r in results:
        rec, eds = r["videos"][0]["metrics"], [v["metrics"] for v in r["videos"][1:]]
        rows.append([r["clip"], f"`{r['method']}`", fmt(rec["fc_all"]), fmt(rec["warp_error"]), fmt(rec["psnr"], 2),
                     fmt(rec["p99_flow_px"], 2), fmt(mean_or_none([e["fc_all"] for e in eds])),
                     fmt(mean_or_none([e["warp_error"] for e in eds])),
                     fmt(mean_or_none([e["psnr_vs_reconstruction"] for e in eds]), 2),
                     f"{int(rec['is_static'])}/1 / {sum(e['is_static'] for e in eds)}/{len(eds)}"])
    lines += _table(["clip", "method", "rec FC all", "rec warp err", "rec PSNR", "rec p99 flow px", "t2v FC all",
                     "t2v warp err", "edit PSNR vs rec.", "static (rec / t2v)"], rows)
    lines += [""] + [f"![{c} frames](ablation/frames-{c}.png)" for c in s["clips"]] + [""]
    return "\n".join(lines)


def reading(summary: dict, source: dict, results: list[dict]) -> list[str]:
    """Facts computed from the numbers (no judgement beyond fixed thresholds)."""
    rec = {m: e["reconstruction"] for m, e in summary.items()}

    def best(key: str, digits: int = 4, lowest: bool = False) -> str:
        vals = {m: r[key] for m, r in rec.items() if r[key] is not None}
        if not vals:
            return "n/a"
        m = (min if lowest else max)(vals, key=vals.get)
        return f"`{m}` ({fmt(vals[m], digits)})"

    out = ["**Reading the table** (computed from the numbers above).", "",
           f"* Reconstruction: highest FC (all pairs) {best('fc_all')}, lowest warp error "
           f"{best('warp_error', lowest=True)}, highest PSNR {best('psnr', 2)} dB, highest SSIM {best('ssim')}."]
    pairs = [(r["train"]["reconstruction_psnr_db_at_train"], r["videos"][0]["metrics"]["psnr"]) for r in results]
    gaps = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    if gaps:
        out.append(f"* Check: the reconstruction rebuilt from each checkpoint matches the training run's own sample "
                   f"within {max(gaps):.3f} dB PSNR.")
    ae = mean_or_none([e["autoencoder_psnr_db"] for e in summary.values()])
    if ae is not None:
        out.append(f"* The autoencoder alone (encode + decode of the source) reaches {fmt(ae, 2)} dB PSNR: the "
                   "ceiling for any reconstruction here.")
    above = [m for m, r in rec.items() if r["fc_all"] is not None and source["fc_all"] is not None
             and r["fc_all"] > source["fc_all"]]
    if above:
        out.append(f"* {len(above)} of {len(rec)} methods score a higher frame consistency than the source clip "
                   f"itself ({fmt(source['fc_all'])}): blur and lost detail raise this measure, so above the source it "
                   "does not mean a better video. Read it next to PSNR/SSIM, motion and the frames below.")
    for a, b in (("hyper", "hyper-noadv"), ("pure", "pure-noadv")):
        if a in rec and b in rec and rec[a]["fc_all"] is not None and rec[a]["psnr"] is not None:
            out.append(f"* With vs without the adversarial term, `{a}` vs `{b}`: reconstruction FC "
                       f"{fmt(rec[a]['fc_all'])} vs {fmt(rec[b]['fc_all'])}, PSNR {fmt(rec[a]['psnr'], 2)} vs "
                       f"{fmt(rec[b]['psnr'], 2)} dB, train MSE {fmt(summary[a]['mse_train_last10'])} vs "
                       f"{fmt(summary[b]['mse_train_last10'])}.")
    ratios = [e["ratio_sampling_mean"] for e in summary.values() if e["ratio_sampling_mean"]]
    lo, hi = (min(ratios), max(ratios)) if ratios else (0.0, 0.0)
    if ratios:
        size = ("a few percent of the UNet's noise at most: small, as the paper reports" if hi < 0.05 else
                f"up to {hi * 100:.0f} % of the UNet's noise: a perturbation, but larger than the 'tiny' the "
                "paper reports" if hi < 0.5 else "comparable to the UNet's own output, unlike the paper's report")
        out.append(f"* The perturbation ratio ||delta|| / ||eps_theta|| during sampling is {fmt(lo, 3)}..{fmt(hi, 3)} "
                   f"(mean per VGT method): {size}.")
    edits = [(r["clip"], r["method"], mean_or_none([v["metrics"]["psnr_vs_reconstruction"] for v in r["videos"][1:]]))
             for r in results if len(r["videos"]) > 1]
    if edits:
        vals = [e[2] for e in edits]
        out.append(f"* Edited prompts give videos {fmt(min(vals), 1)}..{fmt(max(vals), 1)} dB PSNR from the same "
                   "method's reconstruction (per clip and method).")
        base = {c: v for c, m, v in edits if m == "none"}
        closer = [(c, m) for c, m, v in edits if m != "none" and c in base and v > base[c]]
        others = [(c, m) for c, m, v in edits if m != "none" and c in base]
        if base and others and len(closer) == len(others) and hi >= 0.1:
            out.append("* Every VGT run's edits stay closer to its reconstruction than `none`'s do (on each clip): "
                       "with a ratio this large, a big share of the noise estimate comes from the VGT, which does "
                       "not see the text.")
    return out
