"""ONNX Runtime (CPU, fp32) against PyTorch, output by output, at several shapes.

Two halves, so that the PyTorch module can be freed before any ONNX Runtime session holds
the same weights: ``reference_outputs`` runs PyTorch at every shape (small arrays kept),
``compare_network`` opens one session and checks it against them (the error metrics of
``apla_rt.backends.compare``; the network's tolerance bounds ``max_abs``).
"""

from __future__ import annotations

import torch

from apla_rt.backends.compare import error_stats, within

from .networks import NetworkExport


def ort_session(path, threads: int | None = None, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def reference_outputs(spec: NetworkExport, shapes: list[dict[str, int]] | None = None) -> list[tuple]:
    """[(sizes, feeds, PyTorch outputs)] at every shape of ``shapes`` (default
    ``spec.validate_at``, whose first is the traced one), as NumPy arrays."""
    refs = []
    for i, sizes in enumerate(shapes or spec.validate_at):
        args = spec.example(sizes, seed=100 + i)
        with torch.no_grad():
            ref = spec.module.eval()(*args)
        outs = ref if isinstance(ref, (tuple, list)) else (ref,)
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
        refs.append((dict(sizes), feeds, [r.float().numpy() for r in outs]))
    return refs


def compare_network(spec: NetworkExport, onnx_path, refs: list[tuple], threads: int | None = None) -> dict:
    """One ONNX Runtime session against ``reference_outputs``; NaN/Inf or an error over
    tolerance fails. The session is closed before returning."""
    session = ort_session(onnx_path, threads)
    checks = []
    try:
        for sizes, feeds, ref_outs in refs:
            outs = session.run([t.name for t in spec.outputs], feeds)
            for t, r, o in zip(spec.outputs, ref_outs, outs):
                stats = error_stats(r, o)
                checks.append({"shape": dict(sizes), "traced": sizes == spec.validate_at[0], "output": t.name,
                               "output_shape": list(o.shape), **stats,
                               "passed": within(stats, {"max_abs": spec.tolerance["max_abs"]})})
    finally:
        del session
    return {"network": spec.name, "tolerance": spec.tolerance, "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def validate_network(spec: NetworkExport, onnx_path, threads: int | None = None,
                     shapes: list[dict[str, int]] | None = None) -> dict:
    """Compare at every shape of ``shapes`` (default ``spec.validate_at``, whose first is the
    traced one); NaN/Inf or an error over tolerance fails."""
    return compare_network(spec, onnx_path, reference_outputs(spec, shapes), threads)
