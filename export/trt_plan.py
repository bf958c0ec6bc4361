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
  ``apla_rt.pipeline.DECODE_CHUNK`` frames at a time, so its frames range stops there.

``self_attention_score_bytes`` says what one sparse-causal self-attention score tensor
would take in a graph that materialises it, so the plan can show why the portable UNet is
not a reference (48 GiB per fp32 score tensor at 512 px, 24 frames, batch 2, and as much
again for its softmax; twice that at the default profile max of 48 frames).
"""

from __future__ import annotations

from typing import Any, Mapping

from .trt import SHAPE_SETS, Shapes, profile_shapes

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
