"""setup.py's requirement sets, read from the package metadata setuptools writes: `.[gpu]`
gets onnxruntime-gpu (and TensorRT's wheel where it is published) and never onnxruntime; the
CPU installs (`.[cpu]`, `.[train]`, `.[test]`) get onnxruntime and never onnxruntime-gpu;
every package the code imports is declared, and every declared package is used."""

from __future__ import annotations

import ast
import importlib.metadata as md
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("apla_rt", "apla_train", "export", "apla_eval", "apla_ui", "benchmarks", "tests", "tools")
# import name -> distribution, for packages not installed here (no metadata to map them)
NOT_INSTALLED = {"tensorrt": "tensorrt"}
# declared for what they provide without being imported by name
USED_INDIRECTLY = {"onnxscript": "torch's dynamo ONNX exporter (apla-export --dynamo)",
                   "mypy": "tools/typecheck.sh", "pytest": "the test runner"}


@pytest.fixture(scope="module")
def requires(tmp_path_factory) -> list[Requirement]:
    """Requires-Dist of the metadata ``setup.py egg_info`` writes (what pip resolves)."""
    out = tmp_path_factory.mktemp("egg")
    subprocess.run([sys.executable, "setup.py", "--quiet", "egg_info", "--egg-base", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    (info,) = out.glob("*.egg-info")
    meta = Parser().parsestr((info / "PKG-INFO").read_text())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def resolved(requires: list[Requirement], extra: str, platform: dict | None = None) -> dict[str, Requirement]:
    """The requirements pip installs for ``apla[extra]`` ("" = no extra) on ``platform``."""
    env = {**default_environment(), **(platform or {})}
    picked = {}
    for req in requires:
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}) \
                or (extra and req.marker.evaluate({**env, "extra": extra})):
            picked[canonicalize_name(req.name)] = req
    return picked


LINUX = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}
MACOS = {"platform_system": "Darwin", "platform_machine": "arm64", "sys_platform": "darwin"}


def test_gpu_extra_gets_onnxruntime_gpu_not_onnxruntime(requires):
    gpu = resolved(requires, "gpu", LINUX)
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert "tensorrt" in gpu and str(gpu["tensorrt"].specifier) == "<11,>=10.0"
    assert {"torch", "diffusers", "onnx", "polygraphy", "huggingface-hub"} <= set(gpu)
    assert "tensorrt" not in resolved(requires, "gpu", MACOS)  # no wheel there


@pytest.mark.parametrize("extra", ["cpu", "train", "test"])
def test_cpu_installs_get_onnxruntime_not_the_gpu_package(requires, extra):
    got = resolved(requires, extra, LINUX)
    assert "onnxruntime" in got and "onnxruntime-gpu" not in got and "tensorrt" not in got


def test_no_extra_forces_neither_onnxruntime(requires):
    """The base set may not hold either: an extra cannot remove a base requirement."""
    base = resolved(requires, "", LINUX)
    assert not {"onnxruntime", "onnxruntime-gpu", "tensorrt"} & set(base)
    assert {"numpy", "tokenizers", "av", "pillow", "click", "tqdm"} <= set(base)


def test_train_and_test_keep_their_pins(requires):
    for extra in ("train", "test", "gpu"):
        got = resolved(requires, extra, LINUX)
        assert str(got["torch"].specifier) == "==2.14.1" and str(got["torchvision"].specifier) == "==0.29.1"


def _imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over the project's Python files."""
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _local_modules() -> set[str]:
    local = set(PACKAGES)
    for pkg in PACKAGES:
        local |= {p.stem for p in (ROOT / pkg).glob("*.py")}
    return local


def test_every_import_is_declared_and_every_declaration_used(requires):
    declared = set()
    for extra in ("", "cpu", "train", "test", "gpu", "serve"):
        declared |= set(resolved(requires, extra, LINUX))
    dists = md.packages_distributions()
    imported_dists = set()
    missing = []
    for module, files in sorted(_imports().items()):
        if module in sys.stdlib_module_names or module in _local_modules():
            continue
        names = {canonicalize_name(d) for d in dists.get(module, [])} or {NOT_INSTALLED.get(module, module)}
        if "onnxruntime" in names:  # either ORT package provides the module
            names.add("onnxruntime-gpu")
        imported_dists |= names
        if not names & declared:
            missing.append(f"{module} ({', '.join(sorted(files))})")
    assert not missing, f"imported but not declared in setup.py: {missing}"
    unused = sorted(declared - imported_dists - set(USED_INDIRECTLY))
    assert not unused, f"declared in setup.py but never imported: {unused}"
