"""The engine folder's ``manifest.json`` (format 1): read, validate, verify, typed accessors.

The manifest is the only contract the runtime reads (docs/architecture.md). ``Manifest.open``
checks the schema (format name and version, the five networks' tensor names from the
contract, dims, dtypes, profile ranges, the scheduler, the VAE factor, the tokenizer), and
that every path it names is relative, stays inside the folder (no ``..``, no absolute path,
no symlink pointing out) and exists. Artifacts are checked against the sha256 in ``files``
when they are used (``verify``): each file is hashed once per open, streamed in 1 MiB
blocks. A mismatch or a missing file is an ``IntegrityError`` naming the file.
``verify_in_background`` hashes in a thread while the caller loads the same files (ONNX
Runtime creating its session), and the caller waits for the verdict before using anything
the files produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import ConfigError, InputError, IntegrityError
from ..sampling.schedule import SchedulerConfig
from ..sampling.settings import SamplingSettings, check_steps
from ..sampling.solvers import check_solver
from .int8 import Int8Model, parse_section as parse_int8

FORMAT = "apla-engines"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

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
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def _fail(message: str) -> IntegrityError:
    return IntegrityError(f"invalid manifest: {message}; re-run the export")


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
            raise _fail(f"{where} needs 'name', 'dtype' and 'dims', got {entry!r}")
        name, dtype, dims = entry["name"], entry["dtype"], entry["dims"]
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}: name must be a non-empty string")
        if dtype not in DTYPES:
            raise _fail(f"{where} {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(dims, list) or not dims:
            raise _fail(f"{where} {name!r}: dims must be a non-empty list")
        for d in dims:
            if not ((is_int(d) and d >= 1) or (isinstance(d, str) and d)):
                raise _fail(f"{where} {name!r}: dim {d!r} is neither a positive integer nor a name")
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
            raise _fail(f"networks.{name} must be an object")
        onnx = _optional_path(root, entry.get("onnx"), f"networks.{name}.onnx")
        engine = _optional_path(root, entry.get("engine"), f"networks.{name}.engine")
        if onnx is None and engine is None:
            raise _fail(f"networks.{name} has neither an 'onnx' nor an 'engine' file")
        ins, outs = entry.get("inputs"), entry.get("outputs")
        if not isinstance(ins, list) or not isinstance(outs, list):
            raise _fail(f"networks.{name} needs 'inputs' and 'outputs' lists")
        inputs = tuple(TensorSpec.parse(e, f"networks.{name} input") for e in ins)
        outputs = tuple(TensorSpec.parse(e, f"networks.{name} output") for e in outs)
        external = entry.get("external_data") or []
        if not isinstance(external, list):
            raise _fail(f"networks.{name}.external_data must be a list of file names")
        external_data = tuple(safe_path(root, rel, f"networks.{name}.external_data") for rel in external)
        want_in, want_out = CONTRACT[name]
        optional = OPTIONAL_INPUTS.get(name, ())
        for kind, got, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
            got_names = sorted(t.name for t in got)
            extra = set(got_names) - set(want) - (set(optional) if kind == "inputs" else set())
            if not set(want) <= set(got_names) or extra or len(set(got_names)) != len(got_names):
                raise _fail(f"networks.{name} {kind} are {got_names}; the contract says {sorted(want)}")
        profile = _profile(entry.get("profile"), name)
        for spec in inputs:
            for dim in spec.dims:
                if isinstance(dim, str) and dim not in profile:
                    raise _fail(f"networks.{name}: dim {dim!r} of {spec.name!r} has no profile range")
        tolerance = entry.get("tolerance") or {}
        if not isinstance(tolerance, Mapping):
            raise _fail(f"networks.{name}.tolerance must be an object")
        onnx_ort = _optional_path(root, entry.get("onnx_ort"), f"networks.{name}.onnx_ort")
        onnx_fp16 = _optional_path(root, entry.get("onnx_fp16"), f"networks.{name}.onnx_fp16")
        fp16_io = _fp16_io(entry.get("onnx_fp16_io"), name, inputs + outputs) if onnx_fp16 else {}
        return cls(name, onnx, engine, external_data, inputs, outputs, profile, dict(tolerance), onnx_ort,
                   onnx_fp16, fp16_io)


def _fp16_io(io: Any, name: str, tensors: tuple[TensorSpec, ...]) -> dict[str, np.dtype]:
    """``onnx_fp16_io`` ({"inputs"|"outputs": {tensor: dtype}}) -> {tensor: dtype}, covering
    exactly the network's tensors."""
    where = f"networks.{name}.onnx_fp16_io"
    if not isinstance(io, Mapping) or not all(isinstance(io.get(k), Mapping) for k in ("inputs", "outputs")):
        raise _fail(f"{where} must map 'inputs' and 'outputs' to {{tensor: dtype}}")
    merged = {**io["inputs"], **io["outputs"]}
    want = sorted(t.name for t in tensors)
    if sorted(merged) != want:
        raise _fail(f"{where} names {sorted(merged)}; the network's tensors are {want}")
    for tensor, dtype in merged.items():
        if dtype not in DTYPES:
            raise _fail(f"{where}[{tensor!r}]: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return {k: np.dtype(v) for k, v in merged.items()}


def _profile(profile: Any, name: str) -> dict[str, tuple[int, int, int]]:
    if not isinstance(profile, Mapping):
        raise _fail(f"networks.{name}.profile must map dim names to [min, opt, max]")
    out: dict[str, tuple[int, int, int]] = {}
    for dim, rng in profile.items():
        if (not isinstance(rng, list) or len(rng) != 3 or not all(is_int(v) for v in rng)
                or not 1 <= rng[0] <= rng[1] <= rng[2]):
            raise _fail(f"networks.{name}.profile[{dim!r}] = {rng!r} is not [min, opt, max] "
                        "with 1 <= min <= opt <= max")
        out[str(dim)] = (int(rng[0]), int(rng[1]), int(rng[2]))
    return out


# --------------------------------------------------------------------------- paths


def safe_path(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` (symlinks resolved)."""
    if not isinstance(rel, str) or not rel.strip():
        raise _fail(f"{what} must be a non-empty relative path, got {rel!r}")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith(("/", "\\")):
        raise IntegrityError(f"{what} {rel!r} is an absolute path; the manifest may only name "
                             "files inside the engine folder")
    if ".." in posix.parts or ".." in windows.parts:
        raise IntegrityError(f"{what} {rel!r} points outside the engine folder ('..'); refusing it")
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise IntegrityError(f"{what} {rel!r} resolves outside the engine folder (a symlink to "
                             f"{real}); refusing it")
    return path


def _optional_path(root: Path, rel: Any, what: str) -> Path | None:
    return None if rel is None else safe_path(root, rel, what)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the manifest


@dataclass(eq=False)
class Manifest:
    """A validated ``manifest.json`` and its folder; see ``Manifest.open``."""

    root: Path
    data: dict[str, Any]
    networks: dict[str, NetworkSpec]
    scheduler: SchedulerConfig
    vae_scaling_factor: float
    latent_channels: int
    vae_downsample: int
    tokenizer_dir: Path
    model_max_length: int
    start_latent_path: Path | None
    prompt: str
    files: dict[str, str]
    _verified: set[str] = field(default_factory=set)
    source_latent_path: Path | None = None  # the clean latent a vgt.source VGT reads
    start_timestep: int | None = None  # the timestep the start latent belongs to, if recorded
    int8: dict[str, Int8Model] = field(default_factory=dict)  # apla_rt.folder.int8

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, engine_dir: str | os.PathLike) -> "Manifest":
        """Read and validate ``engine_dir/manifest.json`` (artifacts are hashed by ``verify``)."""
        root = Path(engine_dir)
        if not root.exists():
            raise InputError(f"engine folder {root} does not exist; export one with apla-export")
        if not root.is_dir():
            raise InputError(f"{root} is not a folder; --engine-dir takes an engine folder")
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise InputError(f"{root} has no {MANIFEST_NAME}; it is not an engine folder "
                             "(export one with apla-export)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IntegrityError(f"{path} is not readable JSON ({err}); re-run the export") from err
        return cls.from_dict(data, root)

    @classmethod
    def from_dict(cls, data: Any, root: Path) -> "Manifest":
        if not isinstance(data, dict):
            raise _fail("the top level must be an object")
        if data.get("format") != FORMAT:
            raise IntegrityError(f"{root / MANIFEST_NAME} is not an apla engine manifest "
                                 f"(format {data.get('format')!r}, expected {FORMAT!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION or not is_int(version):
            raise IntegrityError(f"engine folder {root} has manifest format_version {version!r}; this "
                                 f"apla-rt reads format_version {FORMAT_VERSION}: re-export it with "
                                 "this apla version, or use the apla-rt that matches the export")

        files = data.get("files")
        if not isinstance(files, dict) or not files:
            raise _fail("'files' must map every artifact to its sha256")
        for rel, digest in files.items():
            safe_path(root, rel, "files entry")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise _fail(f"files[{rel!r}] is not a lowercase hex sha256")

        nets = data.get("networks")
        if not isinstance(nets, dict):
            raise _fail("'networks' must be an object")
        unknown = sorted(set(nets) - set(CONTRACT))
        if unknown:
            raise _fail(f"unknown networks {unknown}; known: {sorted(CONTRACT)}")
        missing = [n for n in REQUIRED_NETWORKS if n not in nets]
        if missing:
            raise _fail(f"networks {missing} are missing")
        networks = {name: NetworkSpec.parse(name, entry, root) for name, entry in nets.items()}

        sched = data.get("scheduler")
        if not isinstance(sched, dict):
            raise _fail("'scheduler' must be an object of scheduler settings")
        try:
            scheduler = SchedulerConfig.from_dict(sched)
        except ConfigError as err:
            raise _fail(str(err)) from err

        factor = data.get("vae_scaling_factor")
        if (isinstance(factor, bool) or not isinstance(factor, (int, float))
                or not math.isfinite(factor) or factor <= 0):
            raise _fail(f"vae_scaling_factor must be a positive number, got {factor!r}")
        channels, down = data.get("latent_channels", 4), data.get("vae_downsample", 8)
        for key, value in (("latent_channels", channels), ("vae_downsample", down)):
            if not is_int(value) or value < 1:
                raise _fail(f"{key} must be a positive integer, got {value!r}")

        tok = data.get("tokenizer")
        if not isinstance(tok, dict) or "dir" not in tok:
            raise _fail("'tokenizer' must be an object with 'dir' (and 'model_max_length')")
        tokenizer_dir = safe_path(root, tok["dir"], "tokenizer.dir")
        max_len = tok.get("model_max_length", 77)
        if not is_int(max_len) or max_len < 2:
            raise _fail(f"tokenizer.model_max_length must be an integer >= 2, got {max_len!r}")

        start = _optional_path(root, data.get("start_latent"), "start_latent")
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str):
            raise _fail("'prompt' must be a string")

        source = _optional_path(root, data.get("source_latent"), "source_latent")
        start_t = data.get("start_timestep")  # absent in folders exported before it was recorded
        if start_t is not None and (not is_int(start_t) or not scheduler.steps_offset <= start_t
                                    < scheduler.num_train_timesteps):
            raise _fail(f"start_timestep must be an integer from {scheduler.steps_offset} to "
                        f"{scheduler.num_train_timesteps - 1}, got {start_t!r}")
        manifest = cls(root, data, networks, scheduler, float(factor), int(channels), int(down),
                       tokenizer_dir, int(max_len), start, prompt, dict(files),
                       source_latent_path=source,
                       start_timestep=int(start_t) if start_t is not None else None,
                       int8=parse_int8(data.get("int8"), partial(safe_path, root), files, networks))
        for spec in networks.values():
            for path in (spec.onnx, spec.onnx_ort, spec.onnx_fp16, spec.engine, *spec.external_data):
                if path is not None:
                    manifest._listed(path)
        for latent in (start, source):
            if latent is not None:
                manifest._listed(latent)
        return manifest

    # -- integrity ----------------------------------------------------------------------

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _listed(self, path: Path) -> str:
        rel = self.rel(path)
        if rel not in self.files:
            raise _fail(f"{rel} is used but has no sha256 in 'files'")
        return rel

    def verify(self, paths: Iterable[Path | str] | None = None) -> None:
        """Check artifacts against ``files`` (all listed ones when ``paths`` is None).

        A path under a listed folder (e.g. the tokenizer folder) verifies every listed file
        in it. Each file is hashed at most once per ``Manifest``. Raises ``IntegrityError``.
        """
        for rel in self._wanted(paths):
            if rel not in self._verified:
                self._check_file(rel, sha256_file)

    def verify_in_background(self, paths: Iterable[Path | str]) -> "Verification":
        """Start hashing ``paths`` (as ``verify``) in a thread; ``wait()`` on the result
        raises the ``IntegrityError`` if one differs. The caller loads the files meanwhile:
        the hash and the load share the page cache, so the disk is read once."""
        wanted = [rel for rel in self._wanted(paths) if rel not in self._verified]
        return Verification(self, wanted)

    def _wanted(self, paths: Iterable[Path | str] | None) -> list[str]:
        if paths is None:
            return list(self.files)
        wanted: list[str] = []
        for p in paths:
            rel = self.rel(Path(p)) if isinstance(p, Path) else p
            inside = [f for f in self.files if f == rel or f.startswith(rel.rstrip("/") + "/")]
            if not inside:
                raise _fail(f"{rel} is used but has no sha256 in 'files'")
            wanted += [f for f in inside if f not in wanted]
        return wanted

    def read_verified(self, path: Path) -> bytes:
        """One listed file's bytes, checked against its sha256 as read: what is loaded is
        what was verified, and a large file (a TensorRT engine) is read once."""
        rel = self.rel(path)
        if rel not in self.files:
            raise _fail(f"{rel} is used but has no sha256 in 'files'")
        data = b""

        def digest(full: Path) -> str:
            nonlocal data
            data = full.read_bytes()
            return hashlib.sha256(data).hexdigest()

        self._check_file(rel, digest)
        return data

    def _check_file(self, rel: str, digest: Callable[[Path], str]) -> None:
        path = safe_path(self.root, rel, "files entry")
        if not path.is_file():
            raise IntegrityError(f"{rel} is listed in the manifest but missing from {self.root}; "
                                 "re-run the export")
        if digest(path) != self.files[rel]:
            raise IntegrityError(f"{rel} does not match its sha256 in the manifest (corrupted or "
                                 "modified); re-run the export")
        self._verified.add(rel)

    # -- accessors ----------------------------------------------------------------------

    def network(self, name: str) -> NetworkSpec:
        if name not in self.networks:
            raise IntegrityError(f"the engine folder {self.root} has no {name} network; re-export "
                                 f"the run (it is needed here)")
        return self.networks[name]

    def has(self, name: str) -> bool:
        return name in self.networks

    @property
    def versions(self) -> dict[str, Any]:
        v = self.data.get("versions")
        return dict(v) if isinstance(v, dict) else {}

    @property
    def checkpoint_sha256(self) -> str | None:
        v = self.data.get("checkpoint_sha256")
        return v if isinstance(v, str) else None

    def sampling_defaults(self) -> SamplingSettings:
        """The run's sampling settings (steps, guidance, solver), each from the manifest's
        ``sample_defaults``, else its config's ``sample`` section; None where neither records
        it, except the solver: "ddim" for folders that record none."""
        return _sampling_defaults(self._sample_sections())

    def inversion_steps(self) -> int | None:
        """The run's ``sample.inversion_steps``, else its sampling steps; None if neither."""
        for key in ("inversion_steps", "steps"):
            value = _recorded(self._sample_sections(), key)
            if value is not None:
                return check_steps(value, f"the run's sample.{key}")
        return None

    def run_setting(self, section: str, key: str) -> Any:
        """A value of the run's config (``config.SECTION.KEY``), or None."""
        config = self.data.get("config")
        part = config.get(section) if isinstance(config, dict) else None
        return part.get(key) if isinstance(part, dict) else None

    def _sample_sections(self) -> list[dict[str, Any]]:
        """Where the run's sampling settings are, first first."""
        config = self.data.get("config")
        sections = (self.data.get("sample_defaults"),
                    config.get("sample") if isinstance(config, dict) else None)
        return [s for s in sections if isinstance(s, dict)]

    @property
    def fps(self) -> float:
        """Frame rate for written videos: ``fps``, else ``sample_defaults.fps``, else the run
        config's ``sample.fps``, else 8."""
        value = self.data.get("fps")
        defaults = self.data.get("sample_defaults")
        if value is None and isinstance(defaults, dict):
            value = defaults.get("fps")
        if value is None:
            config = self.data.get("config")
            sample = config.get("sample") if isinstance(config, dict) else None
            value = sample.get("fps") if isinstance(sample, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 240:
            return float(value)
        return 8.0

    def frame_range(self) -> tuple[int, int, int]:
        """[min, opt, max] frames that every network seeing the whole video accepts."""
        ranges = [s.profile["frames"] for n, s in self.networks.items()
                  if n in ("unet", "vgt") and "frames" in s.profile]
        if not ranges:
            raise _fail("the unet profile has no 'frames' range")
        lo = max(r[0] for r in ranges)
        hi = min(r[2] for r in ranges)
        opt = min(max(ranges[0][1], lo), hi)
        return lo, opt, hi

    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents: the start latent's, else the UNet profile's opt."""
        if self.start_latent_path is not None:
            shape = self.start_latent_shape()
            assert shape is not None
            return int(shape[3]), int(shape[4])
        unet = self.network("unet")
        dims = unet.input("sample").dims
        size = []
        for d in dims[3:]:
            size.append(d if is_int(d) else unet.profile[str(d)][1])
        return int(size[0]), int(size[1])

    def start_latent_shape(self) -> tuple[int, ...] | None:
        """Shape of the start latent (read from the .npy header), None without one."""
        if self.start_latent_path is None:
            return None
        try:
            shape = np.load(self.start_latent_path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as err:
            raise IntegrityError(f"{self.rel(self.start_latent_path)} is not a .npy file ({err}); "
                                 "re-run the export") from err
        if len(shape) != 5:
            raise IntegrityError(f"{self.rel(self.start_latent_path)} has shape {list(shape)}, not "
                                 "(1, c, frames, height, width); re-run the export")
        return tuple(shape)

    def load_start_latent(self) -> np.ndarray:
        """The inverted start latent (1, c, f, h, w) float32, verified against its hash."""
        if self.start_latent_path is None:
            raise InputError(f"the engine folder {self.root} has no start latent; pass --from-noise "
                             "or --latent FILE.npy")
        self.verify([self.start_latent_path])
        return check_latent(load_npy(self.start_latent_path), self.latent_channels,
                            self.rel(self.start_latent_path))

    def load_source_latent(self) -> np.ndarray:
        """The clip's clean latent (1, c, f, h, w) for a VGT trained with ``vgt.source``."""
        if self.source_latent_path is None:
            raise InputError("this model's VGT reads the clean source latent (vgt.source) but the "
                             "engine folder has none; re-export the run, or pass --no-vgt")
        self.verify([self.source_latent_path])
        return check_latent(load_npy(self.source_latent_path), self.latent_channels,
                            self.rel(self.source_latent_path))


class Verification:
    """Files of a manifest being hashed in a thread (``Manifest.verify_in_background``)."""

    def __init__(self, manifest: Manifest, rels: list[str]):
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if rels:
            self._thread = threading.Thread(target=self._run, args=(manifest, rels),
                                            name="apla-verify", daemon=True)
            self._thread.start()

    def _run(self, manifest: Manifest, rels: list[str]) -> None:
        try:
            for rel in rels:
                manifest._check_file(rel, sha256_file)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            self._error = err

    def wait(self) -> None:
        """Block until every file is hashed; raise the first ``IntegrityError`` (or I/O error)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise InputError(f"{path} does not exist") from err
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a readable .npy array ({err})") from err


def check_latent(z: Any, channels: int, what: str) -> np.ndarray:
    """A latent video (1, channels, f, h, w), finite, as float32; ``InputError`` otherwise."""
    if not isinstance(z, np.ndarray) or z.dtype.kind != "f":
        raise InputError(f"{what} must hold a float array, got {getattr(z, 'dtype', type(z).__name__)}")
    if z.ndim != 5 or z.shape[0] != 1 or z.shape[1] != channels:
        raise InputError(f"{what} has shape {list(z.shape)}; a latent video is "
                         f"(1, {channels}, frames, height, width)")
    if not np.all(np.isfinite(z)):
        raise InputError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(z, dtype=np.float32)


def _recorded(sections: list[dict[str, Any]], key: str) -> Any:
    """The first value of ``key`` in ``sections`` that is a finite number (or, for
    "scheduler", any value)."""
    for section in sections:
        value = section.get(key)
        if key == "scheduler":
            if value is not None:
                return value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value) if key.endswith("steps") and float(value).is_integer() else value
    return None


def _sampling_defaults(sections: list[dict[str, Any]]) -> SamplingSettings:
    steps, guidance = _recorded(sections, "steps"), _recorded(sections, "guidance")
    solver = _recorded(sections, "scheduler")
    return SamplingSettings(
        steps=None if steps is None else check_steps(steps, "the run's sample.steps"),
        guidance=None if guidance is None else float(guidance),
        solver="ddim" if solver is None else check_solver(solver, "the run's sample.scheduler"))
