"""The runtime's TensorRT runner: a ``.plan`` engine through Polygraphy's ``TrtRunner``.

TensorRT and Polygraphy are imported when a runner is made, never at module import. The
engine's own I/O tensors (names, dtypes, ranks; read with TensorRT's API in ``engine_io``)
are checked against the manifest's network before the first call (``check_engine_io``): an
engine built from another export is refused in one line instead of failing inside TensorRT.
Feeds are cast to the engine's input dtypes (an engine with FP16 I/O takes the same float32
feeds as any runner) and outputs come back in the manifest's dtypes.

This module is type-checked against ``tensorrt-stubs`` by ``tools/typecheck.sh``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, NamedTuple

import numpy as np

from ..errors import BackendUnavailable, IntegrityError
from ..folder.contract import NetworkSpec
from .ort import _ConstantsMixin

if TYPE_CHECKING:
    import tensorrt as trt

FLOATS = (np.dtype("float32"), np.dtype("float16"))
INTS = (np.dtype("int64"), np.dtype("int32"))


class EngineTensor(NamedTuple):
    """One I/O tensor of an engine: "input"/"output", dtype, shape (-1 = dynamic)."""

    mode: str
    dtype: np.dtype
    shape: tuple[int, ...]


def engine_io(engine: trt.ICudaEngine) -> dict[str, EngineTensor]:
    """The engine's I/O tensors, read with TensorRT's tensor API (TensorRT >= 8.5)."""
    import tensorrt as trt

    out: dict[str, EngineTensor] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        dims = engine.get_tensor_shape(name)
        out[name] = EngineTensor(mode, dtype, tuple(int(dims[k]) for k in range(len(dims))))
    return out


def check_engine_io(spec: NetworkSpec, io: Mapping[str, EngineTensor], what: str) -> None:
    """The engine's tensors are the network's: same names per direction, same ranks, fixed
    dims equal, and a dtype of the same kind (float32/float16, int64/int32)."""
    for mode, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        want = sorted(t.name for t in tensors)
        got = sorted(n for n, t in io.items() if t.mode == mode)
        if got != want:
            raise IntegrityError(f"{what} has {mode}s {got} but the manifest's {spec.name} has {want}; "
                                 "rebuild the engines with apla-export")
        for t in tensors:
            e = io[t.name]
            family = FLOATS if t.dtype in FLOATS else INTS
            ok_dims = len(e.shape) == len(t.dims) and all(
                isinstance(d, str) or s in (-1, d) for s, d in zip(e.shape, t.dims))
            if e.dtype not in family or not ok_dims:
                raise IntegrityError(f"{what}: {mode} {t.name!r} is {e.dtype} {list(e.shape)}, the "
                                     f"manifest says {t.dtype} {list(t.dims)}; rebuild the engines")


class TrtRunner(_ConstantsMixin):
    """A TensorRT engine through Polygraphy (imported here, never at module import)."""

    backend = "tensorrt"

    def __init__(self, spec: NetworkSpec, path: Path, engine: bytes):
        """``engine``: the serialised engine read from ``path`` (verified by the caller)."""
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self.spec = spec
        self._constants = {}
        try:
            loaded = EngineFromBytes(engine)()
        except Exception as err:  # deserialisation fails for another TensorRT version or GPU
            raise BackendUnavailable(f"TensorRT cannot load {path.name} ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:200]}); engines are tied to the "
                                     "TensorRT version and GPU they were built with: rebuild them "
                                     "here or use --backend ort-cuda") from err
        io = engine_io(loaded)
        check_engine_io(spec, io, path.name)
        self._in_dtypes = {n: t.dtype for n, t in io.items() if t.mode == "input"}
        self._out_dtypes = {t.name: t.dtype for t in spec.outputs}
        self._runner = PolygraphyTrtRunner(loaded, name=spec.name)
        self._runner.activate()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        merged = {k: np.ascontiguousarray(v, dtype=self._in_dtypes[k]) for k, v in self._feeds(feeds).items()}
        out = self._runner.infer(merged)
        return {name: np.array(out[name], dtype=self._out_dtypes[name], copy=True)
                for name in self.spec.output_names}

    def close(self) -> None:
        self._runner.deactivate()
