"""``apla-rt serve`` on Ray Serve, on loopback with the session's exported tiny run: one Ray
instance (``ray.init(num_cpus=2)``) and one app shared by the module's tests. A response
equals the library's video for the same seed; concurrent requests share a batch; bad input
is a 400 with the CLI's message, a flood a 503 with Retry-After, an expired timeout a 504;
a killed replica is replaced; and the CLI server stops on SIGINT/SIGTERM leaving no process.
Every request count and wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH, MAX_QUEUE = 4, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of a GET (no body) or a POST."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


@pytest.fixture(scope="module")
def server(exported):
    """The app on 127.0.0.1 (from noise, batches of up to 4 gathered for 300 ms): base URL."""
    import ray
    from ray import serve

    from apla_rt.serve import build_app

    _, folder = exported
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2,
             logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"engine_dir": str(folder), "max_batch": MAX_BATCH, "batch_wait_ms": 300,
                             "max_queue": MAX_QUEUE, "from_noise": True, "threads": 1}),
                  name="apla", route_prefix="/")
        yield f"http://127.0.0.1:{port}", folder
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def library(exported):
    from apla_rt import Pipeline

    _, folder = exported
    with Pipeline.open(folder, "ort", threads=1) as pipe:
        yield pipe


def test_response_equals_the_library(server, library):
    url, _ = server
    assert call(url + "/healthz")[0] == 200
    status, headers, body = call(url + "/generate", {"prompt": "a man is skiing", "seed": 3, "steps": 2,
                                                     "guidance": 5.0, "format": "gif"})
    assert status == 200, body
    assert headers["content-type"] == "image/gif" and headers["x-apla-seed"] == "3"
    assert headers["x-apla-batch-size"] == "1"
    want, = library.generate("a man is skiing", seeds=3, from_noise=True, steps=2, guidance=5.0)
    assert body == want.encode("gif")
    status, headers, body = call(url + "/generate", {"prompt": "a man is skiing", "steps": 1})
    assert status == 200 and headers["content-type"] == "video/mp4" and body[4:8] == b"ftyp"
    assert int(headers["x-apla-seed"]) >= 0  # a random seed, reported
    info = json.loads(call(url + "/info")[2])
    assert info["prompt"] == "a man is skiing" and info["serve"]["max_batch"] == MAX_BATCH


def test_concurrent_requests_share_a_batch(server, library):
    url, _ = server
    prompts = ["a man is skiing", "a panda is skiing", "a man", "a dog is skiing"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: call(url + "/generate", {"prompt": prompts[i], "seed": i,
                                                                   "steps": 2, "format": "gif"}), range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert max(int(r[1]["x-apla-batch-size"]) for r in results) > 1
    from apla_rt.video import read_video

    for i, (_, _, body) in enumerate(results):
        want, = library.generate(prompts[i], seeds=i, from_noise=True, steps=2)
        got = read_video_bytes(body, read_video)
        assert got.shape == want.frames.shape
        np.testing.assert_allclose(got.astype(int), read_video_bytes(want.encode("gif"), read_video),
                                   atol=1)


def read_video_bytes(data: bytes, read_video) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.gif"
        path.write_bytes(data)
        return read_video(path)


def _cli_error(folder: Path, *args: str) -> str:
    from click.testing import CliRunner

    from apla_rt.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        result = CliRunner().invoke(main, ["generate", "--engine-dir", str(folder), "--out", f"{tmp}/x.mp4",
                                           "--from-noise", "--quiet", *args])
        assert result.exit_code == 2 and not os.listdir(tmp)
    return result.stderr.strip().removeprefix("error: ")


def test_bad_input_is_a_400_with_the_cli_message(server):
    url, folder = server
    long_prompt = "ski " * 100
    cases = [
        ({"prompt": "a man", "frames": 99}, _cli_error(folder, "--prompt", "a man", "--frames", "99")),
        ({"prompt": long_prompt}, _cli_error(folder, "--prompt", long_prompt)),
        ({"prompt": "a man", "steps": 0}, _cli_error(folder, "--prompt", "a man", "--steps", "0")),
        ({"prompt": " "}, _cli_error(folder, "--prompt", " ")),
        ({"prompt": "a man", "colour": "red"}, "unknown field(s) 'colour'"),
        ({"seed": 1}, "Missing option '--prompt'"),
        ({"prompt": "a man", "seed": "one"}, "--seed must be an integer"),
        ({"prompt": "a man", "format": "avi"}, "format must be mp4 or gif"),
        (b"{not json", "the request body is not JSON"),
        (b"[1, 2]", "the request body must be a JSON object"),
    ]
    for body, message in cases:
        status, headers, data = call(url + "/generate", body)
        assert status == 400, (body, data)
        error = json.loads(data)["error"]
        assert message in error and "\n" not in error, (error, message)
    assert "outside the engines' range" in cases[0][1] and "prompt is too long" in cases[1][1]
    assert call(url + "/nowhere")[0] == 404


def test_a_flood_gets_503_with_retry_after_and_a_short_timeout_504(server):
    url, _ = server
    n = 2 * (MAX_BATCH + MAX_QUEUE)
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: call(url + "/generate", {"prompt": "a man", "seed": i, "steps": 20},
                                               timeout=120), range(n)))
    statuses = [r[0] for r in results]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= MAX_BATCH + MAX_QUEUE - 1
    for status, headers, body in results:
        if status == 503:
            assert int(headers["retry-after"]) >= 1 and "--max-queue" in json.loads(body)["error"]
    status, _, body = call(url + "/generate", {"prompt": "a man", "steps": 50},
                           headers={"X-Apla-Timeout-S": "0.05"})
    assert status == 504 and "timeout of 0.05 s" in json.loads(body)["error"]
    assert call(url + "/generate", {"prompt": "a man", "steps": 1})[0] == 200  # still serving


def test_a_killed_replica_is_replaced(server):
    url, _ = server
    pid = json.loads(call(url + "/info")[2])["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    status = 0
    while time.monotonic() < deadline:
        try:
            status = call(url + "/generate", {"prompt": "a man", "seed": 1, "steps": 1}, timeout=30)[0]
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(1)
    assert status == 200
    assert json.loads(call(url + "/info")[2])["pid"] != pid
    assert all(call(url + "/generate", {"prompt": "a man", "seed": s, "steps": 1})[0] == 200 for s in (2, 3))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_cli_server_stops_on_a_signal_leaving_no_process(exported, tmp_path, sig):
    _, folder = exported
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "apla_rt.cli", "serve", "--engine-dir", str(folder),
                             "--port", str(port), "--max-batch", "2", "--num-cpus", "0.5"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    family: list = []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if call(f"http://127.0.0.1:{port}/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert call(f"http://127.0.0.1:{port}/generate", {"prompt": "a man", "steps": 1})[0] == 200
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family  # Ray's processes
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob("*.gif"))  # nothing written
