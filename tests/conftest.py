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


# ---------------------------------------------------------------------------------------
# Training fixtures (tests/test_train*.py): one tiny trained run shared by the session


@pytest.fixture(scope="session", autouse=True)
def _two_torch_threads():
    """The suite's timings assume 2 CPU threads, whatever the machine has."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def skiing(shared_data) -> Path:
    """man-skiing.mp4: 91 frames with an audio track."""
    return clip_path("man-skiing.mp4")


# The shared tiny run: 6 steps, checkpoints at 3 and 6, the adversarial term on from step 3,
# 4 frames at 32 px (8x8 latents), 2 sampling and 2 inversion steps.
TINY_RUN_ARGS = ["--prompt", "a man is skiing", "--model", "tiny", "--steps", "6", "--frames", "4",
                 "--size", "32", "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=3",
                 "--set", "loss.adv_start=2", "--set", "sample.steps=2", "--set", "sample.inversion_steps=2",
                 "--quiet"]


@pytest.fixture(scope="session")
def tiny_run_args() -> list[str]:
    """apla-train options of the shared tiny run (VIDEO and --out not included)."""
    return list(TINY_RUN_ARGS)


@pytest.fixture(scope="session")
def tiny_run(skiing, tmp_path_factory):
    """A tiny run trained once through ``apla-train`` (click's CliRunner): (folder, result)."""
    from click.testing import CliRunner

    from apla_train.cli import main

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    result = CliRunner().invoke(main, [str(skiing), "--out", str(run), *TINY_RUN_ARGS])
    assert result.exit_code == 0, result.output
    return run, result


@pytest.fixture
def empty_torch_hub(tmp_path):
    """torch hub pointed at an empty folder: no LPIPS backbone weights are available."""
    import torch

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(old)


@pytest.fixture(scope="session")
def alexnet_weights(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) torchvision AlexNet state dict: an offline LPIPS backbone."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path
