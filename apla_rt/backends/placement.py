"""Where each network runs, decided once when an engine folder is opened: ``place`` turns
``--backend``, ``--precision`` and ``--threads`` into a ``Placement`` (a backend and a
precision per network, and why), which the runner pool opens, and ``apla-rt info``, serve's
``/info`` and the batch job's ``index.json`` report. Nothing below this module sees "auto".

``--backend auto|ort-cpu|ort-cuda|trt|ort|openvino`` (``select_backend``): TensorRT where the
folder has engines and TensorRT and a GPU are usable, else ONNX Runtime's CUDA provider where
onnxruntime-gpu sees a GPU, else the CPU: ONNX Runtime, or OpenVINO where ``--precision auto``
finds that it pays (``auto_cpu_backend``: an AMX CPU and a UNet of 100 MB or more).

``--precision auto|fp32|bf16|int8`` (``apla_rt.backends.precision``): bf16 runs on OpenVINO only,
network by network where its check against ONNX Runtime fp32 passed (cached per machine); a
network whose check missed runs fp32 and the placement says so (``notes``). int8 likewise runs
on OpenVINO only, on the folder's int8 models whose recorded check passed
(``precision.int8_available``); ``auto`` leaves it out.

``--threads N`` (``check_threads``): the CPU threads of ONNX Runtime or OpenVINO; with N >= 2
on a CPU the UNet's two guidance halves run side by side (``Placement.split_guidance``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import AplaError, BackendUnavailable, InputError
from ..folder.manifest import Manifest
from . import precision as cpu_precision
from .gpu import ort_cuda_available, ort_cuda_status, trt_available
from .ort import _onnx_files
from .precision import int8_available  # (bool, why) per network: int8 is a candidate where True

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt", "ort", "openvino")
BACKEND_HELP = ("auto: TensorRT when the folder has engines and TensorRT and a GPU are usable, "
                "else ONNX Runtime's CUDA provider when onnxruntime-gpu sees a GPU, else the CPU (ONNX "
                "Runtime; OpenVINO in bf16 on an AMX CPU for a UNet of 100 MB or more with "
                "--precision auto); "
                "ort-cpu / ort-cuda: ONNX Runtime on that provider; trt: TensorRT engines; "
                "ort: ONNX Runtime, CUDA when usable; openvino: OpenVINO's CPU plugin (fp32, "
                "bf16 or int8, see --precision; the [openvino] extra).")
# What a placement names: "trt", "ort-cuda", "ort" (ONNX Runtime on the CPU) or "openvino".
RUNNER_NAMES = {"ort": "onnxruntime-cpu", "ort-cuda": "onnxruntime-cuda", "trt": "tensorrt",
                "openvino": "openvino-cpu"}
UNET_GRAPHS = ("unet", "unet_feature", "unet_shallow")


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

    def describe(self) -> str:
        """"onnxruntime-cpu (why)": the runners' names and why that backend."""
        kinds = sorted({c.runner for c in self.networks.values()})
        return f"{', '.join(kinds) or RUNNER_NAMES[self.backend]} ({self.why})"

    def describe_precision(self) -> str:
        """"fp32", "bf16", or per precision its networks ("bf16 (unet, vgt), fp32 (...)")."""
        by: dict[str, list[str]] = {}
        for name, choice in self.networks.items():
            by.setdefault(choice.precision, []).append(name)
        if len(by) <= 1:
            return next(iter(by), "fp32")
        return ", ".join(f"{p} ({', '.join(names)})" for p, names in sorted(by.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON for ``/info`` and ``index.json``."""
        return {"backend": self.describe(), "precision": self.describe_precision(),
                "threads": self.threads, "split_guidance": self.split_guidance,
                "networks": {n: {"backend": c.runner, "precision": c.precision, "why": c.why}
                             for n, c in self.networks.items()},
                "notes": list(self.notes)}


def place(manifest: Manifest, networks: tuple[str, ...], backend: str = "auto",
          precision: str = "auto", threads: int | None = None, *, guidance_batch: bool = True,
          check: bool = True) -> Placement:
    """Decide where the folder's networks run (module docstring): the backend from
    ``networks``, those opened now; the others (the VAE encoder of a pipeline opened for
    generation, the cache graphs before a request uses them) run on the same backend.
    ``guidance_batch``: the UNet will run guidance batches (generation; inversion runs batch 1).
    A bf16 check not cached yet runs for ``networks`` only, and not at all with
    ``check=False`` (``apla-rt info``): such a network is placed in fp32, saying so."""
    check_threads(threads)
    precision = cpu_precision.check_precision(precision)
    if precision in ("bf16", "int8") and backend == "auto":
        backend = "openvino"
    chosen, why = select_backend(backend, manifest, networks)
    if backend == "auto" and precision == "auto" and chosen == "ort":
        chosen, why = auto_cpu_backend(manifest, networks) or (chosen, why)
    if precision in ("bf16", "int8") and chosen != "openvino":
        raise InputError(f"--precision {precision} runs on --backend openvino only (backend {backend} "
                         "computes in fp32); drop --backend or use openvino")
    every = tuple(networks) + tuple(n for n in manifest.networks if n not in networks)
    if chosen == "openvino":
        checked = networks if check else ()
        choices, notes = _openvino_precisions(manifest, every, checked, precision, threads)
    else:
        choices, notes = {n: _file_precision(manifest, n, chosen) for n in every}, ()
    split = (guidance_batch and chosen in ("ort", "openvino") and threads is not None
             and threads >= 2 and not ort_cuda_available())
    return Placement(chosen, why, choices, threads, split, notes)


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
    """bf16 per network where asked for (or ``auto`` on an AMX CPU) and its check passed; the
    check runs now for the networks ``checked`` whose verdict is not cached."""
    from . import openvino

    if precision == "fp32":
        return {n: Choice("openvino", "fp32", "requested") for n in networks}, ()
    if precision == "int8":
        return _int8_choices(manifest, networks)
    cpu = cpu_precision.probe_cpu()
    capabilities = openvino.ov_capabilities()
    if precision == "bf16":
        cpu_precision.require_bf16(cpu, capabilities)
    elif not cpu_precision.auto_picks_bf16(cpu, capabilities):
        why = f"no {cpu_precision.AUTO_BF16_FLAG} on this CPU: bf16 would be slower"
        return {n: Choice("openvino", "fp32", why) for n in networks}, ()
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
    if "unet" in networks:
        ok, why = int8_available(manifest, "unet")
        if not ok:
            raise BackendUnavailable(f"--precision int8: unet: {why}; int8 never runs unchecked: "
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


def auto_cpu_backend(manifest: Manifest, networks: tuple[str, ...]) -> tuple[str, str] | None:
    """("openvino", why) where ``--backend auto --precision auto`` would otherwise run ONNX
    Runtime on the CPU but this CPU's AMX runs the folder's UNet faster in bf16
    (``precision.auto_openvino_reason``); None where it stays on ONNX Runtime."""
    specs = [manifest.network(n) for n in networks]
    if "unet" not in networks or any(s.onnx is None for s in specs):
        return None
    unet = manifest.network("unet")
    assert unet.onnx is not None
    unet_mb = sum((manifest.root / rel).stat().st_size
                  for rel in _onnx_files(manifest, unet, unet.onnx) if (manifest.root / rel).exists()) / 2**20
    cpu = cpu_precision.probe_cpu()
    if not cpu_precision.auto_openvino_may_pay(cpu, unet_mb):  # OpenVINO is not even imported
        return None
    from .openvino import openvino_status, ov_capabilities

    if not openvino_status()[0]:
        return None
    why = cpu_precision.auto_openvino_reason(cpu, ov_capabilities(), unet_mb)
    return ("openvino", why) if why else None
