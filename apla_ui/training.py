"""What the Train tab asks for, turned into an ``apla-train`` command line, and checked
before anything is written.

The form's settings travel as the run config's ``--set`` keys (``FIELDS``), after the
advanced lines, so that they win as the CLI's first-class flags do. The config is built by
the CLI's own ``build_config`` from exactly those arguments and checked by the training
code's own ``check_inputs`` (numbers, the clip, the prompt, ``--pretrained``), so a setting
the training would refuse is refused in the page, with the same one-line message, before
the clip is stored or a job recorded.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apla_rt.errors import InputError

from .workspace import VIDEO_SUFFIXES

# the Train tab's fields -> the run config's keys (apla_train.config)
FIELDS = {"steps": "train.steps", "frames": "data.n_frames", "size": "data.size", "vgt": "vgt.kind"}
TINY = "tiny"


@dataclass
class TrainForm:
    """One press of "Start training". ``pretrained`` is used unless ``model`` is ``TINY``."""

    clip: Path
    prompt: str
    model: str = TINY
    pretrained: str = ""
    variant: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # FIELDS' keys; None: the config's default
    advanced: str = ""  # one ``section.key=value`` per line
    export: bool = True  # export the engine folder when training ends
    cache_graphs: bool = True  # with the DeepCache graphs (apla-rt --cache-interval)

    def overrides(self) -> list[str]:
        lines = [ln.strip() for ln in self.advanced.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        for name, value in self.settings.items():
            if name not in FIELDS:
                raise InputError(f"unknown training setting {name!r}")
            if value is None or value == "":
                continue
            if isinstance(value, float):
                if not value.is_integer():
                    raise InputError(f"{name} must be a whole number (got {value})")
                value = int(value)
            lines.append(f"{FIELDS[name]}={value}")
        if self.model != TINY and self.variant.strip():
            lines.append(f"model.variant={self.variant.strip()}")
        return lines

    def model_args(self) -> list[str]:
        if self.model == TINY:
            return ["--model", TINY]
        source = self.pretrained.strip()
        if not source:
            raise InputError("give a Stable Diffusion 1.x folder or a Hugging Face repo id, "
                             "or pick the tiny preset")
        return ["--pretrained", source]

    def train_args(self, video: str, run: str) -> list[str]:
        """``apla-train``'s arguments (after ``-m apla_train.cli``) for ``video`` into ``run``."""
        args = [video, "--prompt", self.prompt.strip(), *self.model_args(), "--out", run, "--quiet"]
        for item in self.overrides():
            args += ["--set", item]
        return args


def vgt_choices() -> list[str]:
    """The VGT variants the config accepts, and its default."""
    from apla_train.config import VGTConfig

    kind = typing.get_type_hints(VGTConfig)["kind"]
    return list(typing.get_args(kind))


def preset_defaults() -> dict[str, dict[str, Any]]:
    """What the form's empty fields mean, per model source: the config's defaults (SD) and
    the tiny preset's, read from ``apla_train.config``."""
    from apla_train.config import AplaConfig, from_dict, tiny_preset

    out = {}
    for source, cfg in (("sd", AplaConfig()), (TINY, from_dict(tiny_preset()))):
        data = cfg.to_dict()
        out[source] = {name: _get(data, key) for name, key in FIELDS.items()}
    return out


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def check(form: TrainForm, max_bytes: int) -> tuple[Any, int]:
    """The run's config and how many training steps it takes, or ``InputError`` (the line the
    training CLI would print) for a form it would refuse. Reads the clip; writes nothing."""
    if not form.prompt or not form.prompt.strip():
        raise InputError("the prompt is empty: describe the clip, e.g. 'a man is skiing'")
    check_clip_file(form.clip, max_bytes)
    from apla_train.cli import build_config
    from apla_train.run import check_inputs

    args = form.model_args()
    pretrained = args[1] if args[0] == "--pretrained" else None
    cfg = build_config(str(form.clip), form.prompt.strip(), TINY if form.model == TINY else None,
                       pretrained, None, tuple(form.overrides()), {})
    try:
        check_inputs(cfg)
    except InputError as err:
        raise InputError(str(err).replace(str(form.clip), form.clip.name)) from err
    return cfg, cfg.train.steps


def check_clip_file(path: Path, max_bytes: int) -> None:
    """A clip is a readable file within the size limit (the frames are checked with the
    run's settings by ``check``)."""
    from apla_rt.media.video import read_video

    if not path.is_file():
        raise InputError("no clip: upload a video (mp4, mov, mkv, webm, gif) or pick an example")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"{path.name} is not a video file: upload one of "
                         f"{', '.join(VIDEO_SUFFIXES)}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise InputError(f"the clip is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:g} MiB "
                         "this apla-ui takes (--max-upload-mb); trim or re-encode it")
    if size == 0:
        raise InputError("the clip is an empty file; upload a video with frames in it")
    try:
        read_video(path, n_frames=1, size=8)
    except InputError as err:  # named by the file the user chose, not the server's copy of it
        raise InputError(str(err).replace(str(path), path.name)) from err
