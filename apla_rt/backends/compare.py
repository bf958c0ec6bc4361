"""Comparing a network's outputs with a reference's, on seeded inputs: the one set of error
metrics and the one input generator behind every numerics check of the project.

Used by the runtime's bf16 check (``apla_rt.backends.openvino.bf16_check``), the export's
validation against PyTorch (``export.validate``), its FP16 check (``export.fp16``) and the
TensorRT engine check's inputs (``export.trt``).

The metrics, per output (``error_stats``):

* ``max_abs``: the largest absolute difference;
* ``mean_abs``: the mean absolute difference;
* ``rel_rms``: the RMS of the difference over max(RMS of the reference, 1) (``rel_rms``):
  relative for outputs of unit size or more (noise predictions, hidden states, images), absolute
  for small ones. A VGT's perturbation near initialisation is O(1e-3) and is added to an O(1)
  noise prediction, so its error matters on that scale, not relative to its own size; an
  output whose reference is all zeros is measured absolutely too.

A NaN or Inf in the output, or an output of another shape, is an infinite error.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..folder.contract import NetworkSpec

# What the checks report per output: the worst of each over a check's outputs and feeds.
METRICS = ("max_abs", "mean_abs", "rel_rms")
# Integer ``*timestep*`` inputs are drawn from [0, TIMESTEPS) unless told the schedule's length.
TIMESTEPS = 1000
# ``input_ids`` range when no real prompts' ids are given and the graph does not reveal its
# vocabulary: CLIP's.
CLIP_VOCAB_SIZE = 49408

Feeds = Mapping[str, np.ndarray]
Run = Callable[[Feeds], Mapping[str, np.ndarray]]
InputsMeta = Mapping[str, tuple[np.dtype, tuple[int, ...]]]  # input name -> (dtype, shape)


# --------------------------------------------------------------------------- error metrics


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0


def rel_rms(ref: np.ndarray, got: np.ndarray) -> float:
    """RMS of ``got - ref`` over max(RMS of ``ref``, 1) (see the module docstring)."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return _rms(got64 - ref64) / max(_rms(ref64), 1.0)


def error_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """``METRICS`` of ``got`` against ``ref``, the reference's largest magnitude
    (``ref_abs_max``) and whether ``got`` is finite. NaN/Inf or a shape mismatch: infinite."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    finite = bool(np.isfinite(got64).all())
    ref_abs_max = float(np.abs(ref64).max(initial=0.0))
    if not finite or ref64.shape != got64.shape:
        return {**{k: float("inf") for k in METRICS}, "ref_abs_max": ref_abs_max, "finite": finite}
    err = np.abs(got64 - ref64)
    return {"max_abs": float(err.max(initial=0.0)), "mean_abs": float(err.mean()) if err.size else 0.0,
            "rel_rms": rel_rms(ref64, got64), "ref_abs_max": ref_abs_max, "finite": True}


def within(stats: Mapping[str, Any], tolerance: Mapping[str, float]) -> bool:
    """Finite, and every metric ``tolerance`` names at most its bound."""
    return bool(stats["finite"]) and all(stats[k] <= v for k, v in tolerance.items())


def worst(stats: Sequence[Mapping[str, Any]], keys: Sequence[str] = METRICS) -> dict[str, float]:
    """The largest of each of ``keys`` over ``stats`` (0 when there are none)."""
    return {k: max((float(s[k]) for s in stats), default=0.0) for k in keys}


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Worst ``max_abs`` and ``rel_rms`` over the outputs of one call."""
    return worst([error_stats(r, got[name]) for name, r in ref.items()], ("max_abs", "rel_rms"))


def run_check(reference: Run, candidate: Run, feeds_list: list[dict[str, np.ndarray]],
              tolerance: Mapping[str, float]) -> dict[str, Any]:
    """``candidate`` against ``reference`` on every feed set: the worst ``max_abs`` and
    ``rel_rms`` (4 significant digits) and whether they are within ``tolerance``."""
    errors = [compare_outputs(reference(feeds), candidate(feeds)) for feeds in feeds_list]
    highest = worst(errors, ("max_abs", "rel_rms"))
    passed = all(highest[k] <= tolerance[k] for k in tolerance)
    return {"passed": passed, "worst": {k: float(f"{v:.4g}") for k, v in highest.items()},
            "tolerance": dict(tolerance), "checks": len(feeds_list)}


# --------------------------------------------------------------------------- seeded inputs


def seeded_inputs(inputs: InputsMeta, seed: int, token_ids: np.ndarray | None = None,
                  vocab_size: int = CLIP_VOCAB_SIZE, timesteps: int = TIMESTEPS) -> dict[str, np.ndarray]:
    """Seeded inputs for ``inputs`` (name -> (dtype, shape)), drawn in their order:

    * ``input_ids``: rows of ``token_ids`` (real prompts' ids) where given, else ids uniform in
      [0, ``vocab_size``);
    * other integers: ``*timestep*`` uniform in [0, ``timesteps``) per element, any other (a
      mask) in {0, 1};
    * floats: ``image`` uniform in [-1, 1], any other N(0, 1).
    """
    if vocab_size < 1 or timesteps < 1:
        raise ConfigError(f"bad input ranges: vocab_size={vocab_size}, timesteps={timesteps}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in inputs.items():
        dtype = np.dtype(dtype)
        if name == "input_ids" and token_ids is not None:
            rows = rng.integers(0, token_ids.shape[0], shape[0])
            feeds[name] = np.ascontiguousarray(token_ids[rows, :shape[1]], dtype=dtype)
        elif dtype.kind in "iub":
            high = timesteps if "timestep" in name else vocab_size if name == "input_ids" else 2
            feeds[name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype.kind == "f":
            values = rng.uniform(-1.0, 1.0, size=shape) if name == "image" else rng.standard_normal(shape)
            feeds[name] = values.astype(dtype)
        else:
            raise ConfigError(f"input {name!r} has dtype {dtype}, which the comparison cannot feed")
    return feeds


def opt_inputs(spec: NetworkSpec) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """A network's inputs at its profile's opt shape: name -> (dtype, shape)."""
    sizes = {d: r[1] for d, r in spec.profile.items()}
    return {t.name: (t.dtype, t.shape(sizes)) for t in spec.inputs}


def seeded_feeds(spec: NetworkSpec, seed: int, token_ids: np.ndarray | None = None,
                 timesteps: int = TIMESTEPS) -> dict[str, np.ndarray]:
    """``seeded_inputs`` for a network of the engine folder at its profile's opt shape."""
    return seeded_inputs(opt_inputs(spec), seed, token_ids, timesteps=timesteps)
