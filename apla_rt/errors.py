"""User-facing errors.

Every error a user can cause (bad input, missing files, tampered artifacts) is an
``AplaError`` whose message is one line that says what to do. The CLIs print it as
``error: <message>`` and exit non-zero; anything else is a bug and keeps its traceback.
"""

import contextlib
import errno
import sys
from typing import Callable, Iterator

# OSError numbers that mean "the machine could not store this" (full disk, quota, read-only,
# permissions, file too large): the CLIs report them in one line; any other OSError is a bug.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class AplaError(Exception):
    """Base of every user-facing error; ``str(err)`` is a single line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(AplaError):
    """A file or argument given by the user cannot be used."""


class VideoError(InputError):
    """A video file is missing, undecodable or too short."""


class ConfigError(InputError):
    """A config file or ``--set`` override is invalid."""


class OutputExistsError(AplaError):
    """An output exists and ``--force`` was not given."""


class IntegrityError(AplaError):
    """An artifact does not match its recorded hash or the manifest is invalid."""


class BackendUnavailable(AplaError):
    """A requested backend (TensorRT, CUDA) is not available here."""


class NonFiniteError(AplaError):
    """Training produced a non-finite loss or gradient."""


@contextlib.contextmanager
def reported_to_user(interrupted: str, disk_error: Callable[[OSError], str] | None = None
                     ) -> Iterator[None]:
    """How the CLIs end on an error, in one line on stderr and never with a traceback:
    ``AplaError`` -> ``error: <message>``, its exit code; with ``disk_error``, an OSError of
    the machine (``DISK_ERRORS``) -> ``error: <disk_error(err)>``, exit 2; Ctrl-C ->
    ``interrupted: <interrupted>``, exit 130. Anything else keeps its traceback: a bug."""
    try:
        yield
    except AplaError as err:
        _exit_with(f"error: {err}", err.exit_code)
    except OSError as err:
        if disk_error is None or err.errno not in DISK_ERRORS:
            raise
        _exit_with(f"error: {disk_error(err)}", 2)
    except KeyboardInterrupt:
        _exit_with(f"interrupted: {interrupted}", 130)


def _exit_with(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
