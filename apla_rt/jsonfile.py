"""Reading a JSON object from a file, with a typed one-line error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import AplaError, InputError


def read_json_object(path: Path, error: type[AplaError] = InputError, *,
                     optional: bool = False) -> dict[str, Any]:
    """The JSON object in ``path`` (``{}`` for an absent file when ``optional``); a file that
    cannot be read, is not JSON or holds something other than an object raises ``error``."""
    if optional and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path} is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
