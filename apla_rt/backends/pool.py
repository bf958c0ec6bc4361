"""The open networks of an engine folder, as the sampling loop calls them.

``RunnerPool`` opens every network it is asked for before sampling starts, as its
``Placement`` says (backend, precision, threads), and warms each up with one call at the
shape the run will use: nothing opens, compiles or runs for the first time inside the loop.
It then runs them for the loop (``apla_rt.sampling.loop.Networks``) and for the text
encoder and the VAE:

* the UNet's full calls run on the DeepCache feature graph (``unet_feature``: the whole UNet,
  which also returns the cached branch's feature) wherever the folder has it, cached steps or
  not (``serving_graph``), so that the UNet's weights are held once however the run samples:
  the plain ``unet`` graph beside it would hold them a second time, the shallow graph shares
  none of the deep blocks' weights;
* a call larger than a network's profile allows on dim 0 (batch or frames) runs in chunks;
* ``pinned``: the text embeddings are handed to the UNet graphs once for the whole loop (on a
  GPU they stay there), and a call that feeds the same array leaves it out;
* a guidance batch [uncond; cond] runs as two concurrent calls, one per half, where the
  placement says so (``Placement.split_guidance``: ONNX Runtime or OpenVINO on a CPU with
  ``--threads`` >= 2): small ops parallelise poorly inside one call, two calls side by side
  keep the cores busy (docs/benchmarks.md). The weights are not duplicated: an ONNX Runtime
  session may be run from several threads at once, and OpenVINO gives each half an infer
  request of its own on a second stream.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping

import numpy as np

from ..folder.manifest import Manifest
from ..sampling.timings import Timings
from .placement import UNET_GRAPHS, Placement, serving_graph
from .runners import Runner, open_runner


def dim0_limit(profile: Mapping[str, tuple[int, int, int]], dims: list[object]) -> int | None:
    """The most rows dim 0 may have, from the profile's ranges of the named dims there."""
    limits = [profile[d][2] for d in dims if isinstance(d, str)]
    return min(limits) if limits else None


class RunnerPool:
    """The runners of one engine folder, opened as ``placement`` says (module docstring)."""

    def __init__(self, manifest: Manifest, placement: Placement, timings: Timings):
        self.manifest = manifest
        self.placement = placement
        self.timings = timings
        self.runners: dict[str, Runner] = {}
        self._warm: set[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]] = set()
        self._pinned: np.ndarray | None = None
        self._halves: ThreadPoolExecutor | None = None
        self.warm = True  # False: runners without a first-call cost (the tests' NumPy twins)

    def open(self, names: tuple[str, ...]) -> None:
        """Open the runners of ``names`` not open yet (each file verified first)."""
        for name in dict.fromkeys(self.graph(n) for n in names):
            if name in self.runners:
                continue
            choice = self.placement.choice(name)
            threads, streams = self.placement.threads, 1
            if name in UNET_GRAPHS and self.placement.split_guidance:
                assert threads is not None
                if choice.backend == "openvino":
                    streams = 2  # one OpenVINO stream per half, sharing ``threads``
                else:
                    threads = threads - 1  # + the second caller = ``threads`` in all
            with self.timings("load"):
                self.runners[name] = open_runner(self.manifest, name, choice.backend, threads,
                                                 precision=choice.precision, streams=streams)

    def warm_up(self, name: str, feeds: Mapping[str, np.ndarray],
                halves: bool = False) -> dict[str, np.ndarray] | None:
        """Run ``name`` once on ``feeds`` (as the loop will: in halves for a guidance batch)
        unless it already ran at these shapes; its outputs, or None where it did not run."""
        name = self.graph(name)
        key = (name, tuple(sorted((k, v.shape) for k, v in feeds.items())))
        if key in self._warm or not self.warm:
            return None
        with self.timings("warm-up"):
            if halves and self.placement.split_guidance:
                out = self._run_halves(name, feeds)
            else:
                out = self.run_outputs(name, feeds)
        self._warm.add(key)
        return out

    def graph(self, name: str) -> str:
        """The runner that serves ``name`` (``serving_graph``)."""
        return serving_graph(self.manifest, name)

    def runner(self, name: str) -> Runner:
        return self.runners[self.graph(name)]

    def has(self, name: str) -> bool:
        return self.graph(name) in self.runners

    # -- calls -----------------------------------------------------------------------------

    def run(self, name: str, feeds: Mapping[str, np.ndarray], preferred: int | None = None) -> np.ndarray:
        """The network's first output, dim 0 split into the chunks its profile takes."""
        return self.run_outputs(name, feeds, preferred)[self.runner(name).spec.output_names[0]]

    def run_outputs(self, name: str, feeds: Mapping[str, np.ndarray],
                    preferred: int | None = None) -> dict[str, np.ndarray]:
        """``run`` with every output of the network."""
        runner = self.runner(name)
        spec = runner.spec
        limit = dim0_limit(spec.profile, [spec.input(k).dims[0] for k in feeds])
        n = next(iter(feeds.values())).shape[0]
        chunk = min(x for x in (limit, preferred, n) if x is not None)
        if chunk >= n:
            return runner.run(feeds)
        parts = [runner.run({k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def unet(self, graph: str, feeds: Mapping[str, np.ndarray], halves: bool) -> dict[str, np.ndarray]:
        """A UNet graph (``unet``, ``unet_feature`` or ``unet_shallow``); the pinned text is
        left out of ``feeds``; a guidance batch in two halves side by side where placed so."""
        feeds = dict(feeds)
        if feeds.get("encoder_hidden_states") is self._pinned and self._pinned is not None:
            del feeds["encoder_hidden_states"]
        with self.timings("unet shallow" if graph == "unet_shallow" else "unet"):
            if halves and self.placement.split_guidance:
                return self._run_halves(graph, feeds)
            return self.run_outputs(graph, feeds)

    def vgt(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        with self.timings("vgt"):
            return self.run("vgt", feeds)

    def _run_halves(self, name: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``name`` on the uncond and the cond half of a guidance batch, the first on a helper
        thread; every output, the halves concatenated."""
        n = next(iter(feeds.values())).shape[0] // 2
        halves = [{k: v[i * n:(i + 1) * n] for k, v in feeds.items()} for i in range(2)]
        if self._halves is None:
            self._halves = ThreadPoolExecutor(1, thread_name_prefix="apla-unet-half")
        first = self._halves.submit(self.run_outputs, name, halves[0])
        try:
            second = self.run_outputs(name, halves[1])
        finally:
            uncond = first.result()
        return {k: np.concatenate([uncond[k], second[k]]) for k in second}

    @contextlib.contextmanager
    def pinned(self, text: np.ndarray, graphs: tuple[str, ...]) -> Iterator[None]:
        """Hand ``text`` to the UNet graphs ``graphs`` once for the loop, where every call takes
        it whole (not split into halves or profile chunks: those feed it per call)."""
        runners = [self.runner(g) for g in dict.fromkeys(graphs)]
        limits = [dim0_limit(r.spec.profile, ["batch"]) for r in runners]
        if any(x is not None and x < text.shape[0] for x in limits) or self.placement.split_guidance:
            yield
            return
        for runner in runners:
            runner.set_constant("encoder_hidden_states", text)
        self._pinned = text
        try:
            yield
        finally:
            self._pinned = None
            for runner in runners:
                runner.set_constant("encoder_hidden_states", None)

    def close(self) -> None:
        if self._halves is not None:  # no half may still be running on a closed runner
            self._halves.shutdown()
            self._halves = None
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
