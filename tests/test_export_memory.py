"""apla-export holds a network's weights once at a time: the UNet family (the full, feature
and shallow graphs share one PyTorch UNet and one ``unet.onnx.data``) is traced in all its
graphs first, and its PyTorch module is freed before the first ONNX Runtime session over
those graphs opens; sessions are validated one after another.

The peak itself is measured at SD size by ``benchmarks/export_memory.py`` (docs/benchmarks.md,
"Export memory (issue 25)"); here, on a tiny run, the order that keeps it down."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

from export import pipeline

FAMILY = ("unet", "unet_shallow")


def test_unet_module_is_freed_before_its_graphs_are_validated(ski_run, tmp_path, monkeypatch):
    unet_ref: list[weakref.ref] = []
    events: list[tuple[str, str, bool]] = []  # (stage, graph file, PyTorch UNet alive)
    real_specs, real_export, real_compare = pipeline.network_specs, pipeline.export_onnx, pipeline.compare_network

    def specs(components, *args, **kwargs):
        unet_ref.append(weakref.ref(components.unet))
        return [s for s in real_specs(components, *args, **kwargs) if s.name in FAMILY]

    def alive() -> bool:
        gc.collect()
        return unet_ref[0]() is not None

    def export(spec, sizes, path, **kwargs):
        events.append(("export", Path(path).name, alive()))
        return real_export(spec, sizes, path, **kwargs)

    def compare(spec, path, refs, threads=None):
        events.append(("validate", Path(path).name, alive()))
        return real_compare(spec, path, refs, threads)

    monkeypatch.setattr(pipeline, "network_specs", specs)
    monkeypatch.setattr(pipeline, "export_onnx", export)
    monkeypatch.setattr(pipeline, "compare_network", compare)
    out = tmp_path / "ski"
    manifest = pipeline.export_run(ski_run, out, backend="onnx", log=lambda _m: None)

    graphs = [f"{name}{suffix}.onnx" for name in FAMILY for suffix in ("", ".ort")]
    assert [e[:2] for e in events] == [("export", g) for g in graphs] + [("validate", g) for g in graphs]
    assert all(e[2] for e in events if e[0] == "export")  # traced from the live module
    assert not any(e[2] for e in events if e[0] == "validate")  # freed before any session
    # the same files as ever: every graph of the family, one shared weight file, all checked
    assert {n: (e["onnx"], e["onnx_ort"], e["external_data"]) for n, e in manifest["networks"].items()} == {
        n: (f"{n}.onnx", f"{n}.ort.onnx", ["unet.onnx.data"]) for n in FAMILY}
    report = json.loads((out / "validation.json").read_text())["networks"]
    assert sorted(report) == sorted(g[: -len(".onnx")] for g in graphs)
    assert all(r["passed"] and r["checks"] for r in report.values())
