"""The engine folder's ``manifest.json`` (format 1): read, validate, verify, typed accessors.

The manifest is the only contract the runtime reads (docs/architecture.md). ``Manifest.open``
checks the schema (format name and version, the networks against ``contract.CONTRACT``, dims,
dtypes, profile ranges, the noise schedule, the VAE factor, the tokenizer), and that every path
it names is relative, stays inside the folder and exists (``files.safe_path``). Artifacts are
checked against the sha256 in ``files`` when they are used (``verify``): each file is hashed
once per open. ``verify_in_background`` hashes in a thread while the caller loads the same files
(ONNX Runtime creating its session), and the caller waits for the verdict before using anything
the files produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, InputError, IntegrityError
from ..sampling.schedule import SchedulerConfig
from ..sampling.settings import SamplingSettings, check_steps
from ..sampling.solvers import check_solver
from .contract import NetworkSpec, TensorSpec, is_int, parse_networks
from .files import (Verification, check_file, invalid_manifest, listed_under, optional_path,
                    safe_path, sha256_file)
from .int8 import Int8Model, parse_section as parse_int8

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "NetworkSpec", "TensorSpec",
           "Verification", "check_latent", "is_int", "load_npy", "safe_path", "sha256_file"]

FORMAT = "apla-engines"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
        """Validate the parsed ``manifest.json`` of the folder ``root`` (see the module docstring)."""
        _check_format(data, root)
        files = _files(data.get("files"), root)
        networks = parse_networks(data.get("networks"), root)
        scheduler = _scheduler(data.get("scheduler"))
        factor, channels, down = _vae(data)
        tokenizer_dir, max_len = _tokenizer(data.get("tokenizer"), root)
        start = optional_path(root, data.get("start_latent"), "start_latent")
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str):
            raise invalid_manifest("'prompt' must be a string")
        source = optional_path(root, data.get("source_latent"), "source_latent")
        start_t = _start_timestep(data.get("start_timestep"), scheduler)
        manifest = cls(root, data, networks, scheduler, factor, channels, down, tokenizer_dir, max_len,
                       start, prompt, files, source_latent_path=source, start_timestep=start_t,
                       int8=parse_int8(data.get("int8"), partial(safe_path, root), files, networks))
        for path in _named_files(networks, (start, source)):
            manifest._listed(path)
        return manifest

    # -- integrity ----------------------------------------------------------------------

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _listed(self, path: Path) -> str:
        rel = self.rel(path)
        if rel not in self.files:
            raise invalid_manifest(f"{rel} is used but has no sha256 in 'files'")
        return rel

    def verify(self, paths: Iterable[Path | str] | None = None) -> None:
        """Check artifacts against ``files`` (all listed ones when ``paths`` is None).

        A path under a listed folder (e.g. the tokenizer folder) verifies every listed file
        in it. Each file is hashed at most once per ``Manifest``. Raises ``IntegrityError``.
        """
        for rel in self._wanted(paths):
            if rel not in self._verified:
                self._check_file(rel, sha256_file)

    def verify_in_background(self, paths: Iterable[Path | str]) -> Verification:
        """Start hashing ``paths`` (as ``verify``) in a thread; ``wait()`` on the result
        raises the ``IntegrityError`` if one differs. The caller loads the files meanwhile:
        the hash and the load share the page cache, so the disk is read once."""
        wanted = [rel for rel in self._wanted(paths) if rel not in self._verified]
        return Verification(lambda rel: self._check_file(rel, sha256_file), wanted)

    def _wanted(self, paths: Iterable[Path | str] | None) -> list[str]:
        if paths is None:
            return list(self.files)
        return listed_under(self.files, (self.rel(p) if isinstance(p, Path) else p for p in paths))

    def read_verified(self, path: Path) -> bytes:
        """One listed file's bytes, checked against its sha256 as read: what is loaded is
        what was verified, and a large file (a TensorRT engine) is read once."""
        rel = self._listed(path)
        data = b""

        def digest(full: Path) -> str:
            nonlocal data
            data = full.read_bytes()
            return hashlib.sha256(data).hexdigest()

        self._check_file(rel, digest)
        return data

    def _check_file(self, rel: str, digest: Callable[[Path], str]) -> None:
        check_file(self.root, rel, self.files, digest)
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
            raise invalid_manifest("the unet profile has no 'frames' range")
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



# --------------------------------------------------------------------------- parsing the parts


def _check_format(data: Any, root: Path) -> None:
    """An object of this format and version."""
    if not isinstance(data, dict):
        raise invalid_manifest("the top level must be an object")
    if data.get("format") != FORMAT:
        raise IntegrityError(f"{root / MANIFEST_NAME} is not an apla engine manifest "
                             f"(format {data.get('format')!r}, expected {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION or not is_int(version):
        raise IntegrityError(f"engine folder {root} has manifest format_version {version!r}; this "
                             f"apla-rt reads format_version {FORMAT_VERSION}: re-export it with "
                             "this apla version, or use the apla-rt that matches the export")


def _files(files: Any, root: Path) -> dict[str, str]:
    """``files``: every artifact inside the folder, mapped to its lowercase hex sha256."""
    if not isinstance(files, dict) or not files:
        raise invalid_manifest("'files' must map every artifact to its sha256")
    for rel, digest in files.items():
        safe_path(root, rel, "files entry")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise invalid_manifest(f"files[{rel!r}] is not a lowercase hex sha256")
    return dict(files)


def _scheduler(sched: Any) -> SchedulerConfig:
    """``scheduler``: the noise schedule's settings."""
    if not isinstance(sched, dict):
        raise invalid_manifest("'scheduler' must be an object of scheduler settings")
    try:
        return SchedulerConfig.from_dict(sched)
    except ConfigError as err:
        raise invalid_manifest(str(err)) from err


def _vae(data: dict[str, Any]) -> tuple[float, int, int]:
    """(``vae_scaling_factor``, ``latent_channels``, ``vae_downsample``)."""
    factor = data.get("vae_scaling_factor")
    if (isinstance(factor, bool) or not isinstance(factor, (int, float))
            or not math.isfinite(factor) or factor <= 0):
        raise invalid_manifest(f"vae_scaling_factor must be a positive number, got {factor!r}")
    channels, down = data.get("latent_channels", 4), data.get("vae_downsample", 8)
    for key, value in (("latent_channels", channels), ("vae_downsample", down)):
        if not is_int(value) or value < 1:
            raise invalid_manifest(f"{key} must be a positive integer, got {value!r}")
    return float(factor), int(channels), int(down)


def _tokenizer(tok: Any, root: Path) -> tuple[Path, int]:
    """(the tokenizer folder, ``model_max_length``)."""
    if not isinstance(tok, dict) or "dir" not in tok:
        raise invalid_manifest("'tokenizer' must be an object with 'dir' (and 'model_max_length')")
    tokenizer_dir = safe_path(root, tok["dir"], "tokenizer.dir")
    max_len = tok.get("model_max_length", 77)
    if not is_int(max_len) or max_len < 2:
        raise invalid_manifest(f"tokenizer.model_max_length must be an integer >= 2, got {max_len!r}")
    return tokenizer_dir, int(max_len)


def _start_timestep(start_t: Any, scheduler: SchedulerConfig) -> int | None:
    """The timestep the start latent belongs to; None in folders exported before it was recorded."""
    if start_t is None:
        return None
    if not is_int(start_t) or not scheduler.steps_offset <= start_t < scheduler.num_train_timesteps:
        raise invalid_manifest(f"start_timestep must be an integer from {scheduler.steps_offset} to "
                               f"{scheduler.num_train_timesteps - 1}, got {start_t!r}")
    return int(start_t)


def _named_files(networks: dict[str, NetworkSpec], latents: Iterable[Path | None]) -> Iterator[Path]:
    """Every file the networks and the latents name (each must be listed in ``files``)."""
    for spec in networks.values():
        for path in (spec.onnx, spec.onnx_ort, spec.onnx_fp16, spec.engine, *spec.external_data):
            if path is not None:
                yield path
    for latent in latents:
        if latent is not None:
            yield latent


# --------------------------------------------------------------------------- latent files


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
