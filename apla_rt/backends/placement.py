"""Where each network runs, decided once when an engine folder is opened: ``place`` turns
``--backend``, ``--precision`` and ``--threads`` into a ``Placement`` (a backend and a
precision per network, and why), which the runner pool opens, and ``apla-rt info``, serve's
``/info`` and the batch job's ``index.json`` report. Nothing below this module sees "auto".

``--backend auto|ort-cpu|ort-cuda|trt|ort|openvino`` (``select_backend``): TensorRT where the
folder has engines and TensorRT and a GPU are usable, else ONNX Runtime's CUDA provider where
onnxruntime-gpu sees a GPU, else the CPU.

``--precision auto|fp32|bf16|int8`` (``apla_rt.backends.precision``): on the CPU, ``auto`` (with
``--backend auto``, or among OpenVINO's precisions with ``--backend openvino``) runs each
network where it measured fastest among the candidates that stay faithful
(``apla_rt.backends.choice``: ONNX Runtime fp32, OpenVINO fp32, bf16 and int8; measured once
per machine and cached). ``fp32`` keeps the exact reference (ONNX Runtime fp32 unless
``--backend`` says otherwise). ``bf16`` runs on OpenVINO only, network by network where its
check against ONNX Runtime fp32 passed (cached per machine); a network whose check missed runs
fp32 and the placement says so (``notes``). ``int8`` likewise runs on OpenVINO only, on the
folder's int8 models whose recorded check passed (``precision.int8_available``), the other
networks in fp32.

``--threads N`` (``check_threads``): the CPU threads of ONNX Runtime or OpenVINO; with N >= 2
on a CPU the UNet's two guidance halves run side by side (``Placement.split_guidance``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..errors import AplaError, BackendUnavailable, InputError
from ..folder.manifest import Manifest
from ..sampling.deepcache import FULL_NETWORK
from . import precision as cpu_precision
from .gpu import ort_cuda_available, ort_cuda_status, trt_available
from .precision import int8_available  # (bool, why) per network

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt", "ort", "openvino")
BACKEND_HELP = ("auto: TensorRT when the folder has engines and TensorRT and a GPU are usable, "
                "else ONNX Runtime's CUDA provider when onnxruntime-gpu sees a GPU, else the CPU: "
                "with --precision auto each network where it measured fastest and faithful on "
                "this machine (ONNX Runtime fp32, OpenVINO fp32/bf16/int8; measured once, cached); "
                "ort-cpu / ort-cuda: ONNX Runtime on that provider; trt: TensorRT engines; "
                "ort: ONNX Runtime, CUDA when usable; openvino: OpenVINO's CPU plugin (fp32, "
                "bf16 or int8, see --precision; the [openvino] extra).")
# What a placement names: "trt", "ort-cuda", "ort" (ONNX Runtime on the CPU) or "openvino".
RUNNER_NAMES = {"ort": "onnxruntime-cpu", "ort-cuda": "onnxruntime-cuda", "trt": "tensorrt",
                "openvino": "openvino-cpu"}
UNET_GRAPHS = ("unet", "unet_feature", "unet_shallow")


def serving_graph(manifest: Manifest, name: str) -> str:
    """The graph that runs ``name``'s calls: ``unet_feature`` for ``unet`` where the folder has
    it (and, for TensorRT, its engine), else ``name`` itself."""
    if name != "unet" or not manifest.has(FULL_NETWORK):
        return name
    unet, full = manifest.network("unet"), manifest.network(FULL_NETWORK)
    return FULL_NETWORK if full.engine is not None or unet.engine is None else name


def check_threads(threads: Any) -> int | None:
    """``--threads``: None (the library's own choice) or an integer >= 1."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"--threads must be at least 1, got {threads!r}")
    return threads


@dataclass(frozen=True)
class Choice:
    """How one network runs: ``backend`` ("ort", "ort-cuda", "trt", "openvino"), ``precision``
    ("fp32", "bf16", "fp16", "int8") and why that precision (a check's verdict, a file's type)."""

    backend: str
    precision: str
    why: str = ""

    @property
    def runner(self) -> str:
        """The runner's name as outputs report it: "onnxruntime-cpu", "openvino-cpu-bf16", ..."""
        reduced = self.precision in ("bf16", "fp16", "int8") and self.backend != "trt"
        suffix = f"-{self.precision}" if reduced else ""
        return RUNNER_NAMES[self.backend] + suffix


@dataclass(frozen=True)
class Placement:
    """What ``place`` decided for an engine folder (module docstring)."""

    backend: str  # the backend every network runs on
    why: str  # why that backend
    networks: Mapping[str, Choice]
    threads: int | None = None
    split_guidance: bool = False  # the UNet's guidance halves as two calls side by side
    notes: tuple[str, ...] = field(default=())  # one line per network that fell back

    def choice(self, name: str) -> Choice:
        return self.networks[name]

    def describe(self, names: Iterable[str] | None = None) -> str:
        """"onnxruntime-cpu (why)": the runners' names (of ``names``, or all) and why."""
        kinds = sorted({c.runner for c in self._of(names).values()})
        return f"{', '.join(kinds) or RUNNER_NAMES[self.backend]} ({self.why})"

    def describe_precision(self, names: Iterable[str] | None = None) -> str:
        """"fp32", "bf16", or per precision its networks ("bf16 (unet, vgt), fp32 (...)")."""
        by: dict[str, list[str]] = {}
        for name, choice in self._of(names).items():
            by.setdefault(choice.precision, []).append(name)
        if len(by) <= 1:
            return next(iter(by), "fp32")
        return ", ".join(f"{p} ({', '.join(names)})" for p, names in sorted(by.items()))

    def to_dict(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """JSON for ``/info`` and ``index.json`` (the networks ``names``, or all)."""
        return {"backend": self.describe(names), "precision": self.describe_precision(names),
                "threads": self.threads, "split_guidance": self.split_guidance,
                "networks": {n: {"backend": c.runner, "precision": c.precision, "why": c.why}
                             for n, c in self._of(names).items()},
                "notes": list(self.notes)}

    def _of(self, names: Iterable[str] | None) -> Mapping[str, Choice]:
        return self.networks if names is None else {n: self.networks[n] for n in names}


def place(manifest: Manifest, networks: tuple[str, ...], backend: str = "auto",
          precision: str = "auto", threads: int | None = None, *, guidance_batch: bool = True,
          check: bool = True) -> Placement:
    """Decide where the folder's networks run (module docstring): the backend from
    ``networks``, those opened now; the others (the VAE encoder of a pipeline opened for
    generation, the cache graphs before a request uses them) are placed alike.
    ``guidance_batch``: the UNet will run guidance batches (generation; inversion runs batch 1).
    A check or measurement not cached yet runs for ``networks`` only, and not at all with
    ``check=False`` (``apla-rt info``): such a network is placed in fp32, saying so."""
    check_threads(threads)
    precision = cpu_precision.check_precision(precision)
    if precision != "fp32" and precision != "auto" and backend == "auto":
        backend = "openvino"
    chosen, why = select_backend(backend, manifest, networks)
    if precision not in ("auto", "fp32") and chosen != "openvino":
        raise InputError(f"--precision {precision} runs on --backend openvino only (backend "
                         f"{backend} computes in fp32); drop --backend or use openvino")
    every = tuple(networks) + tuple(n for n in manifest.networks if n not in networks)
    checked = networks if check else ()
    notes: tuple[str, ...] = ()
    if precision == "auto" and (chosen, backend) in (("ort", "auto"), ("openvino", "openvino")):
        choices = _measured(manifest, every, checked, threads, None if backend == "auto" else "openvino")
    elif chosen == "openvino":
        choices, notes = _openvino_precisions(manifest, every, checked, precision, threads)
    else:
        choices = {n: _file_precision(manifest, n, chosen) for n in every}
    unet = next((choices[n] for n in UNET_GRAPHS if n in networks), choices[every[0]] if every else None)
    kind = unet.backend if unet is not None else chosen
    split = (guidance_batch and kind in ("ort", "openvino") and threads is not None
             and threads >= 2 and not ort_cuda_available())
    return Placement(kind, why, choices, threads, split, notes)


def _measured(manifest: Manifest, networks: tuple[str, ...], checked: tuple[str, ...],
              threads: int | None, only: str | None) -> dict[str, Choice]:
    """Each network where it measured fastest and faithful (``apla_rt.backends.choice``), on
    backend ``only`` if given; measured now for ``checked`` where no measurement is cached."""
    from . import choice

    cpu = cpu_precision.probe_cpu()
    out = {}
    for name in networks:
        table = choice.measured(manifest, name, threads, cpu, run=name in checked)
        if table is None:
            out[name] = Choice(only or "ort", "fp32", "not measured on this machine yet")
            continue
        rows = [r for r in table["rows"] if r["passed"] and (only is None or r["backend"] == only)]
        best = min(rows, key=lambda r: r["seconds"]) if rows else {"backend": only, "precision": "fp32"}
        pick = {**table, "chosen": [best["backend"], best["precision"]]}
        out[name] = Choice(str(best["backend"]), str(best["precision"]), choice.describe(pick))
    return out


def _file_precision(manifest: Manifest, name: str, backend: str) -> Choice:
    """ONNX Runtime and TensorRT run what their files hold: FP32 ONNX on the CPU, the FP16
    file on CUDA where the export wrote one, FP16 TensorRT engines."""
    if backend == "trt":
        return Choice("trt", "fp16", "an FP16 TensorRT engine")
    if backend == "ort-cuda" and manifest.network(name).onnx_fp16 is not None:
        return Choice("ort-cuda", "fp16", "the folder's FP16 file for ONNX Runtime's CUDA provider")
    return Choice(backend, "fp32", "")


def _openvino_precisions(manifest: Manifest, networks: tuple[str, ...], checked: tuple[str, ...],
                         precision: str, threads: int | None) -> tuple[dict[str, Choice], tuple[str, ...]]:
    """OpenVINO in the precision asked for: fp32, or bf16 per network where its check passed
    (the check runs now for the networks ``checked`` whose verdict is not cached)."""
    from . import openvino

    if precision == "fp32":
        return {n: Choice("openvino", "fp32", "requested") for n in networks}, ()
    if precision == "int8":
        return _int8_choices(manifest, networks)
    cpu = cpu_precision.probe_cpu()
    cpu_precision.require_bf16(cpu, openvino.ov_capabilities())
    choices, notes = {}, []
    for name in networks:
        verdict = openvino.bf16_verdict(manifest, name, threads, cpu, run=name in checked)
        if verdict is None:
            choices[name] = Choice("openvino", "fp32", "bf16 not checked on this machine yet")
        elif verdict.get("passed") is True:
            choices[name] = Choice("openvino", "bf16", "its bf16 check passed")
        else:
            line = cpu_precision.miss_line(name, verdict)
            choices[name] = Choice("openvino", "fp32", line)
            if name in checked:
                notes.append(line)
    return choices, tuple(notes)


def _int8_choices(manifest: Manifest, networks: tuple[str, ...]) -> tuple[dict[str, Choice], tuple[str, ...]]:
    """int8 per network where the folder's recorded check passed; refused in one line where
    the UNet has no such model (int8 is for the UNet); another network whose int8 check missed
    runs fp32 with a note, one without an int8 model in fp32."""
    unet = serving_graph(manifest, "unet")
    if unet in networks:
        ok, why = int8_available(manifest, unet)
        if not ok:
            raise BackendUnavailable(f"--precision int8: {unet}: {why}; int8 never runs unchecked: "
                                     "use --precision fp32 or bf16")
    choices, notes = {}, []
    for name in networks:
        ok, why = int8_available(manifest, name)
        choices[name] = Choice("openvino", "int8" if ok else "fp32", why)
        if not ok and name in manifest.int8:
            notes.append(f"int8 for {name}: {why}: it runs in fp32")
    return choices, tuple(notes)


def select_backend(requested: str, manifest: Manifest, networks: tuple[str, ...]) -> tuple[str, str]:
    """("trt" | "ort-cuda" | "ort" | "openvino", why) for ``--backend requested`` and the
    networks to be run; "ort" is ONNX Runtime on the CPU provider."""
    if requested not in BACKENDS:
        raise AplaError(f"unknown backend {requested!r}; use one of {', '.join(BACKENDS)}")
    specs = [manifest.network(n) for n in networks]
    if requested == "openvino":
        from .openvino import openvino_status

        missing = [s.name for s in specs if s.onnx is None]
        if missing:
            raise BackendUnavailable(f"the engine folder has no portable ONNX file for "
                                     f"{', '.join(missing)}; re-export the run")
        ok, why = openvino_status()
        if not ok:
            raise BackendUnavailable(f"--backend openvino: {why}")
        return "openvino", "requested"
    no_engine = [s.name for s in specs if s.engine is None]
    no_onnx = [s.name for s in specs if s.onnx is None]
    if requested in ("ort", "ort-cpu", "ort-cuda") or (requested == "auto" and no_engine):
        if no_onnx:
            raise BackendUnavailable(f"the engine folder has no ONNX file for {', '.join(no_onnx)}; "
                                     "use --backend trt or re-export with ONNX files")
        if requested == "ort-cpu":
            return "ort", "requested"
        cuda, why = ort_cuda_status()
        if requested == "ort-cuda":
            if not cuda:
                raise BackendUnavailable(f"--backend ort-cuda: {why}; or use --backend ort-cpu")
            return "ort-cuda", "requested"
        reason = "requested" if requested == "ort" else f"no TensorRT engine for {', '.join(no_engine)}"
        return ("ort-cuda", reason) if cuda else ("ort", reason)
    if requested == "trt" and no_engine:
        raise BackendUnavailable(f"--backend trt: the engine folder has no TensorRT engine for "
                                 f"{', '.join(no_engine)}; build engines with apla-export on a "
                                 "machine with TensorRT, or use --backend ort-cuda / ort-cpu")
    ok, why = trt_available()
    if ok:
        return "trt", "requested" if requested == "trt" else "TensorRT engines and a GPU are available"
    if requested == "trt" or no_onnx:
        raise BackendUnavailable(f"--backend trt: {why}; or use --backend ort-cuda / ort-cpu")
    return ("ort-cuda" if ort_cuda_available() else "ort"), why
