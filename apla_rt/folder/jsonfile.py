"""Reading a user's text or JSON file, with a typed one-line error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AplaError, InputError


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


def read_text_file(path: Path, flag: str) -> str:
    """The UTF-8 text of the file given as ``flag`` (``--jobs``, ``--prompts-file``); a missing
    or unreadable file is an ``InputError`` naming both."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{flag} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{flag} {path} is not a readable UTF-8 text file ({err})") from None
