"""Wall-clock seconds and call counts per stage of a run (``--timings``)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

# The stages in the order a run meets them: opening and warming the networks, the prompts,
# the UNet (full and DeepCache's shallow calls), the VGT, the solver's arithmetic, decoding,
# writing the file.
STAGES = ("load", "warm-up", "text encoder", "unet", "unet shallow", "vgt", "solver", "vae",
          "video write")


class Timings:
    """Seconds and calls per stage (``time.perf_counter``); ``with timings("unet"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(STAGES, 0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.calls[stage] = self.calls.get(stage, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 6) for k, v in self.seconds.items()}, "total": round(self.total, 6)}

    def table(self) -> str:
        total = self.total or 1e-12
        lines = [f"{'stage':<13} {'seconds':>9} {'calls':>6} {'share':>7}"]
        for stage, sec in self.seconds.items():
            lines.append(f"{stage:<13} {sec:>9.3f} {self.calls[stage]:>6} {100 * sec / total:>6.1f}%")
        lines.append(f"{'total':<13} {self.total:>9.3f}")
        return "\n".join(lines)
