"""Shared test fixtures: the real clips in the workplace's ``shared/data`` folder."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def clip_path(name: str) -> Path:
    """Path of a clip in ``shared/data``; skips the test when it is not there."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"test clip {path} is not available")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"test data folder {SHARED_DATA} is not available")
    return SHARED_DATA
