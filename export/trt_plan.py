"""What the TensorRT build checks each engine against, at which shapes: a pure plan.

An engine is compared with ONNX Runtime on seeded inputs. Which shapes and which reference
decide whether the check itself fits in memory at Stable Diffusion sizes:

* **Shapes: the profile's min and opt**, never its max. The max is the most expensive
  point of every network and adds nothing the opt does not already exercise (the same
  kernels, tuned for opt); at 512 px x 24 frames x batch 2 it is also where a reference
  that materialises attention scores cannot run.
* **Reference: the fused-attention graph** (``unet.ort.onnx``: ONNX Runtime's
  ``MultiHeadAttention``, which never materialises queries x keys) wherever the export
  wrote one; the portable graph (what TensorRT parses) otherwise. Its FP32 outputs come from
  ONNX Runtime's CUDA provider where onnxruntime-gpu sees a GPU, else its CPU provider.
* **Profiles follow the runtime's calls** (``export.networks``): the UNet's batch is 1
  (inversion, no guidance) or 2 (the guidance pair); the VAE is called on at most
  ``apla_rt.engine.DECODE_CHUNK`` frames at a time, so its frames range stops there.

``self_attention_score_bytes`` says what one sparse-causal self-attention score tensor
would take in a graph that materialises it, so the plan can show why the portable UNet is
not a reference (48 GiB per fp32 score tensor at 512 px, 24 frames, batch 2, and as much
again for its softmax; twice that at the default profile max of 48 frames).
"""

from __future__ import annotations

from typing import Any, Mapping

from apla_rt.errors import ConfigError
from apla_rt.folder.contract import is_int

Shape = tuple[int, ...]
Shapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
SHAPE_SETS = ("min", "opt", "max")

CHECK_SHAPE_SETS = ("min", "opt")
# One score tensor a reference may materialise; above this the plan refuses the reference.
REFERENCE_ATTENTION_LIMIT = 2 * 1024**3


def self_attention_score_bytes(sample_shape: tuple[int, ...], heads: int = 8, bytes_per: int = 4) -> int:
    """Bytes of the (queries x keys) scores of one sparse-causal self-attention over a UNet
    input of ``sample_shape`` (batch, c, frames, h, w) at full latent resolution: every
    frame's h*w queries attend to 2*h*w keys (itself and the first frame), for every head."""
    batch, _c, frames, h, w = sample_shape
    keys = 2 * h * w if frames > 1 else h * w
    return batch * frames * heads * (h * w) * keys * bytes_per


def reference_for(entry: Mapping[str, Any]) -> tuple[str, bool]:
    """(ONNX file the engine is compared with, whether its attention is fused)."""
    if entry.get("onnx_ort"):
        return str(entry["onnx_ort"]), True
    return str(entry["onnx"]), False


def validation_plan(name: str, entry: Mapping[str, Any], heads: int = 8) -> dict[str, Any]:
    """The check of one network's engine: reference file, shape sets with their input
    shapes, and the score bytes a decomposed-attention reference would need at those shapes
    (0 for a fused reference). Raises ``ValueError`` when the chosen reference would
    materialise more than ``REFERENCE_ATTENTION_LIMIT`` in one tensor."""
    shapes: Shapes = profile_shapes(entry.get("inputs", []), entry.get("profile", {}))
    reference, fused = reference_for(entry)
    checks = []
    for which in CHECK_SHAPE_SETS:
        index = SHAPE_SETS.index(which)
        at = {k: tuple(v[index]) for k, v in shapes.items()}
        scores = 0
        if name.startswith("unet") and not fused:  # unet and its DeepCache graphs
            scores = self_attention_score_bytes(at["sample"], heads)
            if scores > REFERENCE_ATTENTION_LIMIT:
                raise ValueError(f"{name}: the portable reference would need {scores / 2**30:.0f} GiB "
                                 f"for one attention score tensor at the {which} shapes; export the "
                                 "fused-attention flavour (onnx_ort) to check this engine")
        checks.append({"which": which, "shapes": at, "reference_score_bytes": scores})
    return {"network": name, "reference": reference, "fused_reference": fused, "checks": checks,
            "skipped": [w for w in SHAPE_SETS if w not in CHECK_SHAPE_SETS]}


def _dim_ranges(profile: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    if not isinstance(profile, Mapping):
        raise ConfigError(f"profile must map dim names to [min, opt, max], got {profile!r}")
    ranges: dict[str, tuple[int, int, int]] = {}
    for dim, rng in profile.items():
        if (not isinstance(rng, (list, tuple)) or len(rng) != 3
                or not all(is_int(v) for v in rng)):
            raise ConfigError(f"profile[{dim!r}] must be three integers [min, opt, max], got {rng!r}")
        lo, opt, hi = (int(v) for v in rng)
        if lo < 1:
            raise ConfigError(f"profile[{dim!r}] = {list(rng)}: every size must be >= 1")
        if not lo <= opt <= hi:
            raise ConfigError(f"profile[{dim!r}] = {list(rng)}: need min <= opt <= max")
        ranges[str(dim)] = (lo, opt, hi)
    return ranges


def profile_shapes(inputs: list[dict], profile: dict[str, list[int]]) -> Shapes:
    """Min/opt/max shapes per input from a manifest network's ``inputs`` and ``profile``.

    ``inputs`` are ``{"name", "dtype", "dims"}`` with dims mixing fixed integers and dim
    names; ``profile`` gives ``[min, opt, max]`` per dim name. Raises ``ConfigError`` for a
    named dim without a range, a range that is not ``1 <= min <= opt <= max``, or a bad dim.
    """
    ranges = _dim_ranges(profile)
    shapes: Shapes = {}
    for entry in inputs:
        if not isinstance(entry, Mapping) or "name" not in entry or "dims" not in entry:
            raise ConfigError(f"manifest input {entry!r} needs a 'name' and 'dims'")
        name, dims = str(entry["name"]), entry["dims"]
        if name in shapes:
            raise ConfigError(f"manifest input {name!r} is listed twice")
        if not isinstance(dims, (list, tuple)):
            raise ConfigError(f"input {name!r}: dims must be a list, got {dims!r}")
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for dim in dims:
            if is_int(dim):
                if int(dim) < 1:
                    raise ConfigError(f"input {name!r}: fixed dim {dim} must be >= 1")
                size = (int(dim),) * 3
            elif isinstance(dim, str):
                if dim not in ranges:
                    raise ConfigError(f"input {name!r}: dim {dim!r} has no range in the profile; "
                                      f"add \"{dim}\": [min, opt, max]")
                size = ranges[dim]
            else:
                raise ConfigError(f"input {name!r}: dim {dim!r} is neither an integer nor a name")
            lo.append(size[0])
            opt.append(size[1])
            hi.append(size[2])
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes
