"""The shallow DeepCache call's share of a full UNet call, in PyTorch and in the exported graphs.

    python benchmarks/cache_share.py --sd-random [--export-dir DIR] [--size 128 --frames 4]
    python benchmarks/cache_share.py --engine-dir ENGINES   # an apla-export folder's graphs
    python benchmarks/cache_share.py --flops-only            # FLOPs per branch, no weights

``--sd-random`` builds a UNet with Stable Diffusion 1.5's config (random weights, seeded; the
share depends on the architecture and shape, not on the weights), inflated to the temporal
UNet, and times ``unet_with_feature`` (the full UNet + the feature) against ``unet_shallow``
(``apla_train.deepcache``) on a guided batch of 2, ``--frames`` frames at ``--size`` pixels
(latent size / 8), after one warm-up call, median of ``--repeat``; it also counts both
passes' FLOPs with torch's FlopCounter. ``--export-dir`` then exports the two graphs in the
CPU runtime's flavour (fused attention) into one shared weight file there and times them in
ONNX Runtime on the CPU the same way; ``--engine-dir`` times an existing folder's graphs
(``unet_feature.ort.onnx``, ``unet_shallow.ort.onnx``, and ``unet.ort.onnx``).
``--flops-only`` builds the SD-1.5-config UNet (``--tiny``: the tiny preset's) on torch's meta device (no memory, no
arithmetic) and counts both passes' FLOPs for every branch at ``--size``/``--frames``.
Prints one JSON object. Target: the exported shallow call <= 20 % of a full call (measured:
not met, docs/benchmarks.md "DeepCache").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _median_seconds(call: Callable[[], Any], repeat: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops_by_branch(size: int, frames: int, tiny: bool = False) -> dict:
    """FLOPs (torch's FlopCounter) of the full and the shallow pass per branch, on the meta
    device: shapes only, nothing computed."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from apla_train.deepcache import unet_shallow, unet_with_feature
    from apla_train.unet3d import UNet3DConditionModel
    from apla_train.components import tiny_unet2d_config
    from benchmarks.make_sd_shaped import SD15_UNET

    out = {}
    with torch.device("meta"), torch.no_grad():
        unet = UNet3DConditionModel(UNet2DConditionModel(**(tiny_unet2d_config() if tiny else SD15_UNET))).eval()
        h = size // (4 if tiny else 8)  # the tiny preset's autoencoder: 4-pixel patches
        hidden = int(unet.config.cross_attention_dim)
        sample, t, text = torch.empty(2, 4, frames, h, h), torch.zeros(2, dtype=torch.long), torch.empty(2, 77, hidden)
        for branch in range(len(unet.up_blocks)):
            full, shallow = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with full:
                _, feature = unet_with_feature(unet, sample, t, text, branch)
            with shallow:
                unet_shallow(unet, sample, t, text, feature, branch)
            out[branch] = {"full_gflop": full.get_total_flops() / 1e9, "shallow_gflop": shallow.get_total_flops() / 1e9,
                           "share": shallow.get_total_flops() / full.get_total_flops(),
                           "feature_shape": list(feature.shape)}
    return out


def sd_unet(seed: int = 0) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    from apla_train.unet3d import UNet3DConditionModel
    from benchmarks.make_sd_shaped import SD15_UNET

    torch.manual_seed(seed)
    return UNet3DConditionModel(UNet2DConditionModel(**SD15_UNET)).eval()


def torch_share(unet: Any, size: int, frames: int, repeat: int, branch: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from apla_train.deepcache import unet_shallow, unet_with_feature

    g = torch.Generator().manual_seed(1)
    h = size // 8
    sample = torch.randn(2, 4, frames, h, h, generator=g)
    t = torch.tensor([801, 801])
    text = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        noise, feature = unet_with_feature(unet, sample, t, text, branch)
        shallow_noise = unet_shallow(unet, sample, t, text, feature, branch)
        flops = {}
        for name, call in (("full", lambda: unet_with_feature(unet, sample, t, text, branch)),
                           ("shallow", lambda: unet_shallow(unet, sample, t, text, feature, branch))):
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            flops[name] = int(counter.get_total_flops())
        full_s = _median_seconds(lambda: unet_with_feature(unet, sample, t, text, branch), repeat)
        shallow_s = _median_seconds(lambda: unet_shallow(unet, sample, t, text, feature, branch), repeat)
    return {"full_s": full_s, "shallow_s": shallow_s, "share": shallow_s / full_s,
            "flops": flops, "flops_share": flops["shallow"] / flops["full"],
            "shallow_vs_full_max_abs": float((shallow_noise - noise).abs().max()),
            "feature_shape": list(feature.shape)}


def export_graphs(unet: Any, out: Path, size: int, frames: int, branch: int) -> dict:
    """unet_feature.ort.onnx and unet_shallow.ort.onnx of ``unet`` into ``out``, one weight file."""
    from export.networks import NetworkExport, UNetWrapper, _cache_specs, _tensor, default_input
    from export.onnx_export import WeightStore, export_onnx

    h = size // 8
    hidden = int(unet.config.cross_attention_dim)
    latent = ["batch", 4, "frames", "height", "width"]
    at = {"batch": 2, "frames": frames, "height": h, "width": h}
    unet_spec = NetworkExport.build(
        "unet", UNetWrapper(unet),
        [_tensor("sample", "float32", latent), _tensor("timestep", "int64", ["batch"]),
         _tensor("encoder_hidden_states", "float32", ["batch", 77, hidden])],
        [_tensor("noise_pred", "float32", latent)],
        {"batch": [1, 2, 2], "frames": [1, frames, frames], "height": [h] * 3, "width": [h] * 3},
        {"max_abs": 2e-3}, [at], default_input(49408, 1000), weights="unet")
    out.mkdir(parents=True, exist_ok=True)
    store = WeightStore(out / "unet.onnx.data")
    seconds = {}
    for spec in _cache_specs(SimpleNamespace(unet=unet), unet_spec, branch, h):
        start = time.perf_counter()
        export_onnx(spec, at, out / f"{spec.name}.ort.onnx", ort_flavour=True, store=store, external=True)
        seconds[spec.name] = round(time.perf_counter() - start, 1)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return {"export_s": seconds, "unet_weight_bytes": weights,
            "data_file_over_weights": (out / "unet.onnx.data").stat().st_size / weights,
            "folder_over_weights": sum(p.stat().st_size for p in out.iterdir()) / weights}


def ort_share(folder: Path, size: int, frames: int, repeat: int, threads: int, latent: int | None = None) -> dict:
    import onnxruntime as ort

    def session(name: str) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(str(folder / f"{name}.ort.onnx"), opts, providers=["CPUExecutionProvider"])

    full = session("unet_feature")
    hidden = int(full.get_inputs()[2].shape[2])
    rng = np.random.default_rng(1)
    h = latent or size // 8
    feeds = {"sample": rng.standard_normal((2, 4, frames, h, h)).astype(np.float32),
             "timestep": np.array([801, 801], dtype=np.int64),
             "encoder_hidden_states": rng.standard_normal((2, 77, hidden)).astype(np.float32)}
    noise, feature = full.run(["noise_pred", "feature"], feeds)
    full_s = _median_seconds(lambda: full.run(["noise_pred", "feature"], feeds), repeat)
    del full
    shallow = session("unet_shallow")
    shallow_feeds = {**feeds, "feature": feature}
    shallow_noise = shallow.run(["noise_pred"], shallow_feeds)[0]
    shallow_s = _median_seconds(lambda: shallow.run(["noise_pred"], shallow_feeds), repeat)
    del shallow
    out = {"full_s": full_s, "shallow_s": shallow_s, "share": shallow_s / full_s,
           "shallow_vs_full_max_abs": float(np.abs(shallow_noise - noise).max()), "threads": threads}
    if (folder / "unet.ort.onnx").is_file():
        plain = session("unet")
        out["unet_s"] = _median_seconds(lambda: plain.run(["noise_pred"], feeds), repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd-random", action="store_true", help="SD 1.5's UNet config, random weights")
    p.add_argument("--export-dir", type=Path, help="with --sd-random: export the two graphs here and time them")
    p.add_argument("--engine-dir", type=Path, help="time this engine folder's cache graphs in ONNX Runtime")
    p.add_argument("--flops-only", action="store_true", help="FLOPs per branch on the meta device, no timing")
    p.add_argument("--tiny", action="store_true", help="with --flops-only: the tiny preset's UNet config")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (latent: size / 8)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.sd_random and args.engine_dir is None and not args.flops_only:
        p.error("give --sd-random, --engine-dir or --flops-only")
    import torch

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"size": args.size, "frames": args.frames, "batch": 2, "branch": args.branch,
                              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if args.flops_only:
        result["flops_by_branch"] = flops_by_branch(args.size, args.frames, args.tiny)
    if args.sd_random:
        unet = sd_unet()
        result["torch"] = torch_share(unet, args.size, args.frames, args.repeat, args.branch)
        print(json.dumps({"torch": result["torch"]}), file=sys.stderr, flush=True)
        if args.export_dir is not None:
            result["export"] = export_graphs(unet, args.export_dir, args.size, args.frames, args.branch)
            del unet
            import gc

            gc.collect()
            result["onnxruntime"] = ort_share(args.export_dir, args.size, args.frames, args.repeat, args.threads)
    if args.engine_dir is not None:
        manifest = json.loads((args.engine_dir / "manifest.json").read_text())
        result["engine_dir_onnxruntime"] = ort_share(args.engine_dir, args.size, args.frames, args.repeat,
                                                     args.threads, int(manifest["latent_size"]))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
