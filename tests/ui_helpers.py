"""apla-ui servers for the UI tests: started as ``python -m apla_ui.cli`` on 127.0.0.1 at a
free port, in their own process group, and stopped by process id (the server, then every
job process its workspace records), also when a test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from apla_ui.app import SD_LABEL, TINY_LABEL  # noqa: F401 - the Train tab's model choices, for the tests

ROOT = Path(__file__).resolve().parents[1]
# a handful of steps on 4 frames of 32 px; 2 sampling and inversion steps after training
TINY_TRAIN = {"steps": 4, "frames": 4, "size": 32,
              "advanced": "sample.steps=2\nsample.inversion_steps=2\ntrain.checkpoint_every=2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UIServer:
    """One ``apla-ui`` process on a workspace; ``start`` again after ``stop`` is a restart."""

    def __init__(self, workspace: Path, log: Path, max_upload_mb: float = 1.0):
        self.workspace = workspace
        self.log = log
        self.max_upload_mb = max_upload_mb
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "UIServer":
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "GRADIO_TEMP_DIR": str(self.log.parent / "gradio-tmp")}
        with open(self.log, "a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "apla_ui.cli", "--workspace", self.workspace.name, "--host",
                 "127.0.0.1", "--port", str(self.port), "--max-upload-mb", str(self.max_upload_mb)],
                cwd=self.workspace.parent, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"apla-ui exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/config", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"apla-ui did not answer in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's pid, SIGKILL if it has not ended within 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill_jobs(self) -> None:
        """SIGKILL the process group of every job process the workspace records as running."""
        from apla_ui.jobs import find_running_pids

        for pid in find_running_pids(self.workspace):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.stop()
        self.kill_jobs()

    def client(self) -> Any:
        from gradio_client import Client

        return Client(self.url, verbose=False)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def job(client: Any, job_id: str) -> dict[str, Any]:
    (found,) = [j for j in client.predict(api_name="/jobs") if j["id"] == job_id]
    return found


def wait_job(client: Any, job_id: str, timeout: float = 400.0) -> dict[str, Any]:
    """The job's record once it is no longer queued or running."""
    return wait_for(f"job {job_id} to end", lambda: (lambda j: j if j["state"] not in
                    ("queued", "training", "exporting") else None)(job(client, job_id)), timeout, 2.0)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        out[str(path.relative_to(folder))] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return out
