"""The network contract of an engine folder: which networks exist, their tensors' names,
dtypes and dims, and the profile's [min, opt, max] per named dim (docs/architecture.md).

``NetworkSpec.parse`` reads one ``networks`` entry of the manifest and holds it to
``CONTRACT``; ``parse_networks`` reads them all. The export builds its networks against the
same classes (``export.networks``), so both sides share one contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from .files import invalid_manifest, optional_path, safe_path

# Contract: network -> (input names, output names), docs/architecture.md.
CONTRACT: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text_encoder": (("input_ids",), ("last_hidden_state",)),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)),
    "vgt": (("sample", "timestep"), ("delta",)),
    "vae_decoder": (("latent",), ("image",)),
    "vae_encoder": (("image",), ("latent",)),
    # optional, the deep/shallow UNet cache (apla_rt.sampling.deepcache): the full UNet with the cached
    # branch's feature as a second output, and the outer blocks fed that feature
    "unet_feature": (("sample", "timestep", "encoder_hidden_states"), ("noise_pred", "feature")),
    "unet_shallow": (("sample", "timestep", "encoder_hidden_states", "feature"), ("noise_pred",)),
}
# Inputs a network may have besides the contract's: the VGT's clean source latent (vgt.source).
OPTIONAL_INPUTS: Mapping[str, tuple[str, ...]] = {"vgt": ("source",)}
# vgt is absent for a Tune-A-Video run (vgt.kind=none); vae_encoder is only needed to invert;
# the cache graphs exist only in folders exported since they were added.
REQUIRED_NETWORKS = ("text_encoder", "unet", "vae_decoder")
DTYPES = ("float32", "float16", "int64", "int32")


def is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------- tensors and networks


@dataclass(frozen=True)
class TensorSpec:
    """One network input or output: name, dtype and dims (fixed ints or dim names)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...]

    @classmethod
    def parse(cls, entry: Any, where: str) -> "TensorSpec":
        if not isinstance(entry, Mapping) or not {"name", "dtype", "dims"} <= set(entry):
            raise invalid_manifest(f"{where} needs 'name', 'dtype' and 'dims', got {entry!r}")
        name, dtype, dims = entry["name"], entry["dtype"], entry["dims"]
        if not isinstance(name, str) or not name:
            raise invalid_manifest(f"{where}: name must be a non-empty string")
        if dtype not in DTYPES:
            raise invalid_manifest(f"{where} {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(dims, list) or not dims:
            raise invalid_manifest(f"{where} {name!r}: dims must be a non-empty list")
        for d in dims:
            if not ((is_int(d) and d >= 1) or (isinstance(d, str) and d)):
                raise invalid_manifest(f"{where} {name!r}: dim {d!r} is neither a positive integer "
                                       "nor a name")
        return cls(name, np.dtype(dtype), tuple(dims))

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (``parse`` reads it back)."""
        return {"name": self.name, "dtype": self.dtype.name, "dims": list(self.dims)}

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape with each named dim taken from ``sizes``."""
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.dims)


@dataclass(frozen=True)
class NetworkSpec:
    """A network of the engine folder: files, tensors and the profile's [min, opt, max]."""

    name: str
    onnx: Path | None
    engine: Path | None
    external_data: tuple[Path, ...]  # the ONNX file's external weights, if any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: Mapping[str, tuple[int, int, int]]
    tolerance: Mapping[str, Any] = field(default_factory=dict)
    # the same network with ONNX Runtime's fused attention ops (preferred by the ORT runner)
    onnx_ort: Path | None = None
    # an FP16 copy for ONNX Runtime's CUDA provider and its tensors' dtypes (name -> dtype;
    # the runner casts at the boundaries): ``apla-export --fp16``
    onnx_fp16: Path | None = None
    fp16_io: Mapping[str, np.dtype] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no input {name!r}")

    def dim_range(self, dim: str) -> tuple[int, int, int] | None:
        """[min, opt, max] of a named dim, None when this network does not have it."""
        return self.profile.get(dim)

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes, ranks, fixed dims and profile ranges; return the named dims.

        Raises ``InputError`` (one line) for anything the network cannot take.
        """
        names = set(feeds)
        if names != set(self.input_names):
            raise InputError(f"{self.name} takes inputs {sorted(self.input_names)}, got {sorted(names)}")
        bound: dict[str, int] = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray) or value.dtype != spec.dtype:
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise InputError(f"{self.name} input {spec.name!r} must be {spec.dtype}, got {got}")
            if value.ndim != len(spec.dims):
                raise InputError(f"{self.name} input {spec.name!r} must have {len(spec.dims)} dims "
                                 f"{list(spec.dims)}, got shape {list(value.shape)}")
            for size, dim in zip(value.shape, spec.dims):
                if is_int(dim):
                    if size != dim:
                        raise InputError(f"{self.name} input {spec.name!r} has shape {list(value.shape)}"
                                         f" but its dims are {list(spec.dims)}")
                    continue
                assert isinstance(dim, str)
                if bound.setdefault(dim, size) != size:
                    raise InputError(f"{self.name}: dim {dim!r} is {bound[dim]} in one input and "
                                     f"{size} in {spec.name!r}")
                lo, _opt, hi = self.profile[dim]
                if not lo <= size <= hi:
                    raise InputError(f"{dim} = {size} is outside the engines' range {lo}..{hi} "
                                     f"({self.name} input {spec.name!r})")
        return bound

    @classmethod
    def parse(cls, name: str, entry: Any, root: Path) -> "NetworkSpec":
        if not isinstance(entry, Mapping):
            raise invalid_manifest(f"networks.{name} must be an object")
        onnx = optional_path(root, entry.get("onnx"), f"networks.{name}.onnx")
        engine = optional_path(root, entry.get("engine"), f"networks.{name}.engine")
        if onnx is None and engine is None:
            raise invalid_manifest(f"networks.{name} has neither an 'onnx' nor an 'engine' file")
        ins, outs = entry.get("inputs"), entry.get("outputs")
        if not isinstance(ins, list) or not isinstance(outs, list):
            raise invalid_manifest(f"networks.{name} needs 'inputs' and 'outputs' lists")
        inputs = tuple(TensorSpec.parse(e, f"networks.{name} input") for e in ins)
        outputs = tuple(TensorSpec.parse(e, f"networks.{name} output") for e in outs)
        external = entry.get("external_data") or []
        if not isinstance(external, list):
            raise invalid_manifest(f"networks.{name}.external_data must be a list of file names")
        external_data = tuple(safe_path(root, rel, f"networks.{name}.external_data") for rel in external)
        want_in, want_out = CONTRACT[name]
        optional = OPTIONAL_INPUTS.get(name, ())
        for kind, got, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
            got_names = sorted(t.name for t in got)
            extra = set(got_names) - set(want) - (set(optional) if kind == "inputs" else set())
            if not set(want) <= set(got_names) or extra or len(set(got_names)) != len(got_names):
                raise invalid_manifest(f"networks.{name} {kind} are {got_names}; the contract says "
                                       f"{sorted(want)}")
        profile = _profile(entry.get("profile"), name)
        for spec in inputs:
            for dim in spec.dims:
                if isinstance(dim, str) and dim not in profile:
                    raise invalid_manifest(f"networks.{name}: dim {dim!r} of {spec.name!r} has no "
                                           "profile range")
        tolerance = entry.get("tolerance") or {}
        if not isinstance(tolerance, Mapping):
            raise invalid_manifest(f"networks.{name}.tolerance must be an object")
        onnx_ort = optional_path(root, entry.get("onnx_ort"), f"networks.{name}.onnx_ort")
        onnx_fp16 = optional_path(root, entry.get("onnx_fp16"), f"networks.{name}.onnx_fp16")
        fp16_io = _fp16_io(entry.get("onnx_fp16_io"), name, inputs + outputs) if onnx_fp16 else {}
        return cls(name, onnx, engine, external_data, inputs, outputs, profile, dict(tolerance), onnx_ort,
                   onnx_fp16, fp16_io)


def _fp16_io(io: Any, name: str, tensors: tuple[TensorSpec, ...]) -> dict[str, np.dtype]:
    """``onnx_fp16_io`` ({"inputs"|"outputs": {tensor: dtype}}) -> {tensor: dtype}, covering
    exactly the network's tensors."""
    where = f"networks.{name}.onnx_fp16_io"
    if not isinstance(io, Mapping) or not all(isinstance(io.get(k), Mapping) for k in ("inputs", "outputs")):
        raise invalid_manifest(f"{where} must map 'inputs' and 'outputs' to {{tensor: dtype}}")
    merged = {**io["inputs"], **io["outputs"]}
    want = sorted(t.name for t in tensors)
    if sorted(merged) != want:
        raise invalid_manifest(f"{where} names {sorted(merged)}; the network's tensors are {want}")
    for tensor, dtype in merged.items():
        if dtype not in DTYPES:
            raise invalid_manifest(f"{where}[{tensor!r}]: dtype {dtype!r} is not one of "
                                   f"{', '.join(DTYPES)}")
    return {k: np.dtype(v) for k, v in merged.items()}


def _profile(profile: Any, name: str) -> dict[str, tuple[int, int, int]]:
    if not isinstance(profile, Mapping):
        raise invalid_manifest(f"networks.{name}.profile must map dim names to [min, opt, max]")
    out: dict[str, tuple[int, int, int]] = {}
    for dim, rng in profile.items():
        if (not isinstance(rng, list) or len(rng) != 3 or not all(is_int(v) for v in rng)
                or not 1 <= rng[0] <= rng[1] <= rng[2]):
            raise invalid_manifest(f"networks.{name}.profile[{dim!r}] = {rng!r} is not [min, opt, max] "
                        "with 1 <= min <= opt <= max")
        out[str(dim)] = (int(rng[0]), int(rng[1]), int(rng[2]))
    return out


def parse_networks(nets: Any, root: Path) -> dict[str, NetworkSpec]:
    """The manifest's ``networks`` object: known names only, the required ones present."""
    if not isinstance(nets, dict):
        raise invalid_manifest("'networks' must be an object")
    unknown = sorted(set(nets) - set(CONTRACT))
    if unknown:
        raise invalid_manifest(f"unknown networks {unknown}; known: {sorted(CONTRACT)}")
    missing = [n for n in REQUIRED_NETWORKS if n not in nets]
    if missing:
        raise invalid_manifest(f"networks {missing} are missing")
    return {name: NetworkSpec.parse(name, entry, root) for name, entry in nets.items()}
