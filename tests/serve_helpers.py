"""What the serve tests share: a network namespace held open for a test's Ray processes and its
HTTP client, Ray nodes and ``apla-rt serve`` processes started (and stopped by pid) in it.

A namespace's 127.0.0.1 is not the host's: requests to a server in it are made by a small
client process entered into it (``nsenter``), one per request. Where the machine cannot make
a namespace (``netns.netns_status``), everything runs in the host's, on loopback still.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil

from netns import isolated, netns_status

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "apla-test-token-0123456789abcdef"

_CLIENT = r"""
import base64, json, sys, urllib.error, urllib.request
spec = json.loads(sys.argv[1])
body = spec["body"].encode() if spec["body"] is not None else None
req = urllib.request.Request(spec["url"], data=body, headers=spec["headers"],
                             method="GET" if body is None else "POST")
try:
    try:
        with urllib.request.urlopen(req, timeout=spec["timeout"]) as r:
            out = (r.status, dict(r.headers.items()), r.read())
    except urllib.error.HTTPError as err:
        out = (err.code, dict(err.headers.items()), err.read())
    print(json.dumps({"status": out[0], "headers": {k.lower(): v for k, v in out[1].items()},
                      "body": base64.b64encode(out[2]).decode()}))
except OSError as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
"""


class Namespace:
    """A network namespace of its own, held open by a sleeping process, that commands enter."""

    def __init__(self) -> None:
        self.enabled, self.why = netns_status()
        self.holder: subprocess.Popen | None = None
        if self.enabled:
            self.holder = subprocess.Popen(
                isolated([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(3600)"]),
                stdout=subprocess.PIPE, text=True)
            assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "ready"

    def wrap(self, cmd: list[str]) -> list[str]:
        if self.holder is None:
            return list(cmd)
        return [shutil.which("nsenter") or "nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *cmd]

    def close(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(ns: Namespace, url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of a GET (no body) or a POST made inside ``ns``;
    ``OSError`` when nothing answered."""
    data = body.decode() if isinstance(body, bytes) else None if body is None else json.dumps(body)
    spec = json.dumps({"url": url, "body": data, "headers": headers or {}, "timeout": timeout})
    done = subprocess.run(ns.wrap([sys.executable, "-c", _CLIENT, spec]), capture_output=True,
                          text=True, timeout=timeout + 30)
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise OSError(f"the client failed: {done.stderr[-500:]}") from None
    if "error" in out:
        raise OSError(out["error"])
    return out["status"], out["headers"], base64.b64decode(out["body"])


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a test's Ray or apla-rt process: this checkout first on the path, a
    home and a Ray temp root of the test's own (short: Ray's socket paths have a length limit)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k in ("RAY_TMPDIR",)}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **extra)
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="aplaray-"))
    return env


def start(ns: Namespace, cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, IO]:
    """``cmd`` in ``ns``, in a process group of its own (pid == pgid), output to ``log``."""
    out = open(log, "w")
    proc = subprocess.Popen(ns.wrap(cmd), env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=log.parent)
    return proc, out


def ray_node(ns: Namespace, env: dict[str, str], log: Path, *, head_port: int | None = None,
             join: str | None = None, num_cpus: int = 1,
             dashboard_port: int | None = None) -> tuple[subprocess.Popen, IO]:
    """A Ray node (``ray start --block``, node address 127.0.0.1, its own temp dir): a head on
    ``head_port`` (its dashboard on 127.0.0.1:``dashboard_port``, else none), or a worker
    joining ``join``."""
    temp = tempfile.mkdtemp(prefix="aplanode-")
    cmd = [shutil.which("ray") or "ray", "start", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--temp-dir", temp, "--disable-usage-stats"]
    if join is None:
        cmd += ["--head", "--port", str(head_port)]
        cmd += (["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                 str(dashboard_port)] if dashboard_port else ["--include-dashboard", "false"])
    else:
        cmd += ["--address", join]
    return start(ns, cmd, env, log)


def serve_cmd(folder: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "apla_rt.cli", "serve", "--engine-dir", str(folder),
            "--port", str(port), *args]


def printed_config(folder: Path, port: int, tmp: Path) -> Path:
    """``apla-rt serve --print-config`` for the Serve-command tests (from noise, batches of 2,
    half a CPU per replica, the proxy on the head only), written to ``tmp/serve.yaml``."""
    printed = subprocess.run(serve_cmd(folder, port, "--print-config", "--from-noise", "--num-cpus", "0.5",
                                       "--max-batch", "2", "--proxy-location", "HeadOnly"),
                             env=child_env(tmp / "home"), capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    config = tmp / "serve.yaml"
    config.write_text(printed.stdout)
    return config


def wait_healthy(ns: Namespace, url: str, proc: subprocess.Popen, log: Path, seconds: float = 150) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if call(ns, url + "/healthz", timeout=5)[0] == 200:
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
    raise AssertionError(f"the server did not become healthy: {log.read_text()[-3000:]}")


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    """``proc`` and every process it started, as now."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL, by pid, to those of ``processes`` still running (a test's cleanup)."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, seconds: float = 30) -> None:
    """``sig`` to ``proc``; whatever of its family is left after ``seconds`` is killed."""
    members = family(proc)
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(members, timeout=5)
    kill_all(alive)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def json_error(body: bytes) -> Any:
    """The one-line JSON error of an error answer (AssertionError if it is not one)."""
    text = body.decode(errors="replace")
    assert "\n" not in text.strip(), text
    return json.loads(text)["error"]
