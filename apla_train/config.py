"""Configuration: a few dataclasses, defined once, validated on load.

The whole run is described by one ``AplaConfig``. It is written next to every run
(``config.json``), copied into checkpoints and into the engine manifest. The CLI builds it
from the defaults here, then a preset (``--model tiny``), then ``--config FILE``, then
``--set section.key=value``, then its first-class flags; it never re-declares a default.

Unknown keys and wrong types are errors (``ConfigError``), with the offending key named.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from apla_rt.errors import ConfigError
from apla_rt.sampling.solvers import SOLVERS

# sample.final_steps="auto" on a CPU: at most this many inversion and sampling steps after
# training (with an SD-sized model the spec's 50 + 50 take 20-30 min there)
CPU_FINAL_STEPS = 10


@dataclass
class DataConfig:
    start: int = 0  # first frame read from the clip
    stride: int = 2  # read every stride-th frame
    n_frames: int = 24
    size: int = 512  # training resolution (square, pixels)


@dataclass
class ModelConfig:
    preset: Literal["sd", "tiny"] = "sd"  # sd: load --pretrained; tiny: build from configs
    pretrained: Optional[str] = None  # SD 1.x diffusers folder, or a Hub repo id (ORG/NAME)
    variant: Optional[str] = None  # weights variant of --pretrained, e.g. fp16 (*.fp16.safetensors)
    temporal: bool = True  # the attn_temp branch (off = per-frame SD, for parity checks)
    gradient_checkpointing: bool = False
    trainable: Literal["tav", "all"] = "tav"  # tav: attn1.to_q, attn2.to_q, attn_temp
    tiny_patch: int = 4  # tiny preset: pixels per latent cell of the patch-PCA autoencoder
    tiny_widths: tuple[int, ...] = (32, 64)  # tiny preset: UNet block widths (multiples of 8)


@dataclass
class VGTConfig:
    kind: Literal["hyper", "pure", "none"] = "hyper"
    mask: Literal["causal", "none"] = "causal"  # none = the EN (encoder) variants
    patch: int = 4  # latent cells per token side
    dim: int = 256
    heads: int = 8
    spatial_layers: int = 2
    temporal_layers: int = 2
    mlp_ratio: float = 4.0
    max_frames: int = 64
    source: bool = False  # also feed the clean source latent (spec's vgt_source)


@dataclass
class DiscriminatorConfig:
    hidden: tuple[int, ...] = (64, 128)  # 1x1 conv widths after folding frames into channels
    spectral_norm: bool = True
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass
class LossConfig:
    l_mse: float = 1.0
    l_l1: float = 1.0
    l_per: float = 0.1  # LPIPS on decoded clean estimates; 0 disables
    per_t_max: int = 500  # perceptual term only for t < per_t_max
    per_frames: int = 2  # frames decoded per step for the perceptual term
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_weights: Optional[str] = None  # backbone .pth; default: torch hub cache
    l_adv: float = 0.01  # 0 disables the discriminator
    adv_start: int = 50  # first step with the adversarial term


@dataclass
class TrainConfig:
    steps: int = 500
    lr: float = 3e-5  # UNet trainable subset
    vgt_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    seed: int = 33
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    skip_nonfinite: bool = False
    t_min: int = 0  # timesteps sampled in [t_min, num_train_timesteps)


@dataclass
class SampleConfig:
    steps: int = 50
    guidance: float = 12.5
    inversion_steps: int = 50
    # the sampling solver (apla_rt.sampling.solvers.SOLVERS): what apla-rt generate uses by default
    scheduler: str = "ddim"
    fps: float = 8.0
    enabled: bool = True  # sample a video at the end of training
    # The training run's own DDIM inversion and sample after its last step: "all" takes
    # inversion_steps and steps; an integer N at most N of each; "auto" is "all" on a GPU and
    # CPU_FINAL_STEPS on a CPU. (steps, guidance and inversion_steps stay the exported model's
    # defaults either way.)
    final_steps: Union[Literal["auto", "all"], int] = "auto"

    def final_step_counts(self, device: str) -> tuple[int, int]:
        """(inversion steps, sampling steps) after training on ``device`` ("cpu", "cuda", ...)."""
        limit = self.final_steps
        if limit == "auto":
            limit = "all" if device != "cpu" else CPU_FINAL_STEPS
        if limit == "all":
            return self.inversion_steps, self.steps
        assert isinstance(limit, int)
        return min(self.inversion_steps, limit), min(self.steps, limit)


@dataclass
class AplaConfig:
    prompt: str = ""
    video: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vgt: VGTConfig = field(default_factory=VGTConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> "AplaConfig":
        positive = {
            "data.stride": self.data.stride, "data.n_frames": self.data.n_frames,
            "data.size": self.data.size, "model.tiny_patch": self.model.tiny_patch,
            "vgt.patch": self.vgt.patch, "vgt.dim": self.vgt.dim, "vgt.heads": self.vgt.heads,
            "vgt.max_frames": self.vgt.max_frames, "loss.per_frames": self.loss.per_frames,
            "train.steps": self.train.steps, "train.checkpoint_every": self.train.checkpoint_every,
            "train.keep_checkpoints": self.train.keep_checkpoints, "sample.steps": self.sample.steps,
            "sample.inversion_steps": self.sample.inversion_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be at least 1 (got {value})")
        nonneg = {"data.start": self.data.start, "vgt.spatial_layers": self.vgt.spatial_layers,
                  "vgt.temporal_layers": self.vgt.temporal_layers, "train.t_min": self.train.t_min}
        for key, value in nonneg.items():
            if value < 0:
                raise ConfigError(f"{key} must not be negative (got {value})")
        for key in ("l_mse", "l_l1", "l_per", "l_adv"):
            if getattr(self.loss, key) < 0:
                raise ConfigError(f"loss.{key} must not be negative")
        for key in ("lr", "vgt_lr", "grad_clip"):
            if not getattr(self.train, key) > 0:
                raise ConfigError(f"train.{key} must be positive")
        if isinstance(self.sample.final_steps, int) and self.sample.final_steps < 1:
            raise ConfigError(f"sample.final_steps must be \"auto\", \"all\" or at least 1 "
                              f"(got {self.sample.final_steps})")
        if self.sample.scheduler not in SOLVERS:
            raise ConfigError(f"sample.scheduler must be one of {', '.join(SOLVERS)} "
                              f"(got {self.sample.scheduler!r})")
        if self.sample.fps <= 0 or self.sample.fps > 240:
            raise ConfigError(f"sample.fps must be in (0, 240] (got {self.sample.fps})")
        if len(self.model.tiny_widths) != 2 or any(w < 8 or w % 8 for w in self.model.tiny_widths):
            raise ConfigError(f"model.tiny_widths must be two multiples of 8 (got {list(self.model.tiny_widths)})")
        if self.vgt.dim % self.vgt.heads:
            raise ConfigError(f"vgt.dim ({self.vgt.dim}) must be divisible by vgt.heads ({self.vgt.heads})")
        if self.data.n_frames > self.vgt.max_frames:
            raise ConfigError(f"data.n_frames ({self.data.n_frames}) exceeds vgt.max_frames ({self.vgt.max_frames})")
        if self.data.size > 4096 or self.data.n_frames > 1024 or self.train.steps > 10_000_000:
            raise ConfigError("data.size, data.n_frames or train.steps is absurdly large")
        if self.model.preset == "sd" and not self.model.pretrained:
            raise ConfigError("give --pretrained PATH (a Stable Diffusion 1.x diffusers folder) or --model tiny")
        return self


def tiny_preset() -> dict[str, Any]:
    """Overrides for the CPU quickstart: ~1 M UNet parameters, 16x16 latents, 8 frames."""
    return {
        "data": {"n_frames": 8, "stride": 2, "size": 64},
        "model": {"preset": "tiny", "trainable": "all", "tiny_patch": 4},
        "vgt": {"dim": 64, "heads": 4, "patch": 2, "spatial_layers": 1, "temporal_layers": 1},
        "disc": {"hidden": [32, 64]},
        "loss": {"l_per": 0.0, "adv_start": 20},
        "train": {"steps": 150, "lr": 1e-3, "vgt_lr": 1e-4, "checkpoint_every": 50},
        "sample": {"steps": 25, "inversion_steps": 25, "guidance": 3.0, "final_steps": "all"},
    }


# ---------------------------------------------------------------------------------------
# Building and validating from nested dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))} (got {value!r})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items (got {len(value)})")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string (got {value!r})")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(data: dict[str, Any]) -> AplaConfig:
    """Build a config from a (possibly partial) nested dict over the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return _build(AplaConfig, merge(AplaConfig().to_dict(), data), "")


def parse_override(item: str) -> dict[str, Any]:
    """``section.key=value`` -> nested dict; the value is read as JSON, else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (got {item!r})")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (validated later, with the rest)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                          f"{str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data
