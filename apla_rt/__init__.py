"""apla's runtime: NumPy sampling (DDIM, DPM-Solver++ 2M, UniPC) of exported engine
folders, without torch.

``from apla_rt import Pipeline`` is the Python API (``apla_rt.api``); it is imported on
first use, so ``apla_rt.errors`` or ``apla_rt.sampling.schedule`` stay cheap to import.

The subpackages are layers, each importing only from those before it (docs/architecture.md):
``sampling`` (the noise schedule, the solvers, DeepCache, the settings, the loop), ``folder``
(the engine folder: manifest, files, start latents), ``media`` (video files, the tokenizer),
``backends`` (where each network runs and its runners), then ``engine``, ``api``, ``service``
(serve, batch) and ``cli``.
"""

from typing import Any

__all__ = ["Latent", "Pipeline", "Request", "SamplingSettings", "Video"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'apla_rt' has no attribute {name!r}")
