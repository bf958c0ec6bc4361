"""The fields of one video request as JSON, and their checks: one definition for
``apla-rt serve`` (a ``POST /generate`` body, bad input a 400) and ``apla-rt batch`` (a line
of the jobs file, bad input named by its line number). Ray-free.

    {"prompt": str, "seed"?: int, "frames"?: int, "steps"?: int, "guidance"?: number,
     "negative_prompt"?: str, "format"?: "mp4" | "gif",
     "scheduler"?: "ddim" | "dpmpp-2m" | "unipc", "guidance_interval"?: [lo, hi] | "lo:hi",
     "cache_interval"?: int, "cache_schedule"?: "uniform" | "nonuniform"}

``steps`` .. ``cache_schedule`` are the request's ``SamplingSettings`` (``to_dict`` /
``from_dict``). ``null`` stands for an absent optional field. The checks here are those of the
fields alone;
``Pipeline.check`` then refuses what the engine folder cannot take (a prompt too long for the
tokenizer, a frame count outside the profile, a seed out of range, ...).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..api import Request
from ..errors import InputError
from ..sampling.settings import SamplingSettings

# the JSON types of each field; the sampling settings' are checked by SamplingSettings
FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "seed": (int,), "frames": (int,), "negative_prompt": (str,), "format": (str,),
    "steps": (int,), "guidance": (int, float), "scheduler": (str,), "guidance_interval": (list, str),
    "cache_interval": (int,), "cache_schedule": (str,)}
assert set(SamplingSettings.keys()) <= set(FIELDS)
CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}  # the formats a request may ask for


def decode_object(text: bytes | str, what: str) -> Any:
    """``text`` parsed as a JSON object; ``InputError`` "``what`` is not JSON (...)" else."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{what} is not JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a JSON object")
    return data


def parse_request(data: Any, *, seed_required: bool = False) -> tuple[Request, str]:
    """A decoded JSON object -> (Request, format), checking the fields' names and types.
    A missing seed is a random one, or an error with ``seed_required``."""
    if not isinstance(data, dict):
        raise InputError("the request must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(FIELDS)}")
    if "prompt" not in data:
        raise InputError("Missing option '--prompt': the request needs a \"prompt\"")
    for key, value in data.items():
        if value is None and key != "prompt":
            continue
        kinds = FIELDS[key]
        if key == "guidance_interval":
            continue  # checked as the CLI's --guidance-interval below
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise InputError(f"--{key.replace('_', '-')} must be "
                             f"{'text' if kinds == (str,) else 'a number' if float in kinds else 'an integer'}"
                             f", got {value!r}")
    if not data["prompt"].strip():
        raise InputError("--prompt must not be empty")
    fmt = data.get("format") or "mp4"
    if fmt not in CONTENT_TYPES:
        raise InputError(f"format must be mp4 or gif, got {fmt!r}")
    settings = SamplingSettings.from_dict({k: data[k] for k in SamplingSettings.keys() if k in data})
    seed = data.get("seed")
    if seed is None and seed_required:
        raise InputError("the request needs a \"seed\" (an integer): a random one would make a "
                         "rerun a different video")
    request = Request(data["prompt"], secrets.randbelow(2**31) if seed is None else seed,
                      data.get("frames"), data.get("negative_prompt") or "", settings)
    return request, fmt


def request_fields(request: Request, fmt: str) -> dict[str, Any]:
    """A request as the JSON object ``parse_request`` reads back (every field present)."""
    return {"prompt": request.prompt, "seed": int(request.seed), "frames": request.frames,
            "negative_prompt": request.negative_prompt, "format": fmt, **request.settings.to_dict()}
