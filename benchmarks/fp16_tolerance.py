"""Measure the FP16 UNet's error against FP32 in ONNX Runtime (the basis of
``export.fp16.FP16_TOLERANCE``).

    python benchmarks/fp16_tolerance.py --tiny [--json OUT]
    python benchmarks/fp16_tolerance.py --pretrained FOLDER --size 128 --frames 2 [--json OUT]

Builds the UNet (the tiny preset's, or a diffusers SD 1.x folder's such as the SD-1.5-shaped
random one of ``benchmarks/make_sd_shaped.py``), exports its ONNX Runtime flavour (fused
attention) exactly as ``apla-export`` does, converts it with ``export.fp16.convert_file`` and
runs FP32 and FP16 on the same seeded inputs (N(0, 1) latents and text states, timesteps in
[0, 1000)) at every batch/frame shape given, on the CPU provider (a numerics check: FP16
storage, FP32 arithmetic for most ops, see export/fp16.py). Prints one line per check and the
worst figures; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def unet_spec(pretrained: str | None, size: int, frames: int):
    """(export NetworkSpec of the UNet, latent side) for the tiny preset or a diffusers folder."""
    import numpy as np

    from apla_train.components import build_tiny, load_pretrained
    from apla_train.config import AplaConfig
    from export.networks import network_specs

    cfg = AplaConfig()
    cfg.data.size = size
    cfg.data.n_frames = frames
    cfg.vgt.kind = "none"
    if pretrained:
        components = load_pretrained(pretrained)
    else:
        clip = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
        components = build_tiny(clip, patch=4, seed=0)
    components.unet.eval()
    specs = network_specs(components, None, cfg, (1, frames, max(frames, 2)))
    return next(s for s in specs if s.name == "unet"), size // components.codec.downsample


def measure(pretrained: str | None, size: int, frames: int, shapes: list[tuple[int, int]],
            seeds: list[int], threads: int | None, workdir: Path, log=print) -> dict:
    import torch

    from export.fp16 import compare, convert_file, fp16_path, fp16_tolerance
    from export.onnx_export import export_onnx

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    spec, h = unet_spec(pretrained, size, frames)
    fp32 = workdir / "unet.ort.onnx"
    if not fp32.is_file():  # --workdir may hold an earlier export of the same model
        export_onnx(spec, {"batch": 1, "frames": frames, "height": h, "width": h}, fp32, ort_flavour=True)
    export_s = time.time() - started
    del spec
    started = time.time()
    fp16 = fp16_path(fp32)
    convert_file(fp32, fp16)
    convert_s = time.time() - started
    log(f"exported in {export_s:.0f} s, converted in {convert_s:.0f} s "
        f"({fp32.stat().st_size / 2**20:.0f} -> {fp16.stat().st_size / 2**20:.0f} MiB)")
    import numpy as np

    hidden, seq = _text_dims(fp32)
    feeds_list, labels = [], []
    for batch, f in shapes:
        for seed in seeds:
            rng = np.random.default_rng(seed)
            feeds_list.append({
                "sample": rng.standard_normal((batch, 4, f, h, h)).astype(np.float32),
                "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64),
                "encoder_hidden_states": rng.standard_normal((batch, seq, hidden)).astype(np.float32),
            })
            labels.append({"batch": batch, "frames": f, "seed": seed})
    tolerance = fp16_tolerance(size, "sd" if pretrained else "tiny")  # the model's scale, not the size
    started = time.time()
    result = compare(fp32, fp16, feeds_list, tolerance, threads)
    compare_s = time.time() - started
    for label, check in zip(labels, result["checks"]):
        check.update(label)
        log(f"batch {label['batch']} frames {label['frames']} seed {label['seed']}: max abs "
            f"{check['max_abs']:.3e}, mean abs {check['mean_abs']:.3e}, rel RMS {check['rel_rms']:.3e} "
            f"(|ref| max {check['ref_abs_max']:.2f})")
    w = result["worst"]
    margins = {k: tolerance[k] / w[k] for k in tolerance if w[k] > 0}
    log(f"worst: max abs {w['max_abs']:.3e}, mean abs {w['mean_abs']:.3e}, rel RMS {w['rel_rms']:.3e}; "
        f"tolerance {tolerance} (margin " + ", ".join(f"{k} x{v:.1f}" for k, v in margins.items())
        + f"): {'ok' if result['passed'] else 'FAILED'}")
    return {"model": pretrained or "tiny", "size": size, "latent": h, "shapes": shapes, "seeds": seeds,
            "export_seconds": round(export_s, 1), "convert_seconds": round(convert_s, 1),
            "compare_seconds": round(compare_s, 1), "margins": margins, **result}


def _text_dims(onnx_path: Path) -> tuple[int, int]:
    from export.onnx_export import graph_io

    dims = graph_io(onnx_path)["inputs"]["encoder_hidden_states"]
    return int(dims[2]), int(dims[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="the tiny preset's UNet (random, seeded)")
    src.add_argument("--pretrained", help="a diffusers SD 1.x folder")
    parser.add_argument("--size", type=int, help="image size in pixels (default 64 tiny, 128 SD)")
    parser.add_argument("--frames", type=int, default=2, help="traced frame count")
    parser.add_argument("--shape", action="append", default=None, metavar="BATCHxFRAMES",
                        help="check shape, repeatable (default 1x1 and 2x<frames>)")
    parser.add_argument("--seeds", type=int, default=3, help="seeded input sets per shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files here (and reuse an FP32 export there)")
    args = parser.parse_args(argv)
    size = args.size or (64 if args.tiny else 128)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape] if args.shape else \
        [(1, 1), (2, args.frames)]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = measure(args.pretrained, size, args.frames, shapes, list(range(args.seeds)),
                         args.threads, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="apla-fp16-") as tmp:
            report = measure(args.pretrained, size, args.frames, shapes, list(range(args.seeds)),
                             args.threads, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
