#!/usr/bin/env bash
# Type-check the TensorRT code (export/trt.py, export/trt_plan.py and the runtime's
# apla_rt/backends/trt.py) against TensorRT's Python API without TensorRT installed.
#
# TensorRT itself cannot be installed everywhere, but `tensorrt-stubs` carries its whole
# Python API as .pyi files (see ../shared/notes/tensorrt-typecheck.md). This script:
#   1. downloads the stub wheel once into .stubs/.cache (no dependencies: its declared
#      dependency on `tensorrt` cannot install here),
#   2. installs it into that cache folder (never into the venv) and copies the `tensorrt`
#      and `tensorrt_bindings` stub folders into .stubs/ (mypy_path in mypy.ini),
#   3. patches the stubs' syntax slips (parameters named `in`, and `add_scale_nd`'s
#      required `channel_axis` after defaulted parameters),
#   4. runs mypy on export/trt.py, export/trt_plan.py and the runtime's apla_rt/backends/trt.py.
# Steps 1-3 are skipped when .stubs/ already holds this version. Exit codes: mypy's, or 3
# when the stub wheel cannot be downloaded (no network).
set -euo pipefail

STUBS_VERSION="10.13.0.35.1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

STUBS=.stubs
CACHE="$STUBS/.cache"
MARKER="$STUBS/.tensorrt-stubs-$STUBS_VERSION"

if [[ ! -f "$MARKER" || ! -f "$STUBS/tensorrt/__init__.pyi" \
      || ! -f "$STUBS/tensorrt_bindings/tensorrt.pyi" ]]; then
    mkdir -p "$CACHE"
    wheel="$(ls "$CACHE"/tensorrt_stubs-"$STUBS_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
    if [[ -z "$wheel" ]]; then
        if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
                "tensorrt-stubs==$STUBS_VERSION" -d "$CACHE"; then
            echo "typecheck: cannot download tensorrt-stubs==$STUBS_VERSION (no network?)" >&2
            exit 3
        fi
        wheel="$(ls "$CACHE"/tensorrt_stubs-"$STUBS_VERSION"-*.whl | head -n 1)"
    fi
    site="$CACHE/site-$STUBS_VERSION"
    rm -rf "$site"
    "$PY" -m pip install --quiet --no-deps --no-compile --target "$site" "$wheel"
    for pkg in tensorrt tensorrt_bindings; do
        rm -rf "${STUBS:?}/$pkg"
        cp -r "$site/$pkg" "$STUBS/$pkg"
    done
    "$PY" - "$STUBS/tensorrt_bindings/tensorrt.pyi" "$STUBS/tensorrt/__init__.pyi" <<'PYEOF'
"""Fix the stub files' syntax slips in place, then check that both files parse."""
import ast
import re
import sys

bindings = sys.argv[1]
text = open(bindings, encoding="utf-8").read()
# `in` is a keyword: rename the parameter in `def` lines only (docstrings keep `:arg in:`).
text, n_in = re.subn(r"^(\s*def \w+\(.*?)\bin: ", r"\1in_: ", text, flags=re.M)
# A required parameter after defaulted ones: give `channel_axis` a stub default.
text, n_axis = re.subn(r"(def add_scale_nd\(.*?channel_axis: int)\)", r"\1 = ...)", text)
if n_in < 1 or n_axis != 1:
    sys.exit(f"typecheck: stub patch did not apply (in: {n_in}, channel_axis: {n_axis})")
open(bindings, "w", encoding="utf-8").write(text)
for path in sys.argv[1:]:
    ast.parse(open(path, encoding="utf-8").read(), filename=path)
print(f"typecheck: patched {bindings} ({n_in} `in` parameters, add_scale_nd channel_axis)")
PYEOF
    touch "$MARKER"
fi

exec "$PY" -m mypy --config-file mypy.ini export/trt.py export/trt_plan.py apla_rt/backends/trt.py
