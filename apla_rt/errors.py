"""User-facing errors.

Every error a user can cause (bad input, missing files, tampered artifacts) is an
``AplaError`` whose message is one line that says what to do. The CLIs print it as
``error: <message>`` and exit non-zero; anything else is a bug and keeps its traceback.
"""

import errno

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
