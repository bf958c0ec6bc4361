"""``apla-rt serve`` on Ray Serve, on loopback with the session's exported tiny run: one
``apla-rt serve`` process (a local Ray instance, token authentication on) shared by the
module's tests, in a network namespace of its own together with the HTTP client
(tests/serve_helpers.py). A response equals the library's video for the same seed; concurrent
requests share a batch; bad input is a 400 with the CLI's message, a flood a 503 with
Retry-After, an expired timeout a 504; a replica killed mid-request is replaced and the
request retried; and the server stops on
SIGINT/SIGTERM, to its main process or its whole process group, within 15 s leaving no
process. Every request count and wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import require

require("ray.serve")
psutil = require("psutil")

from serve_helpers import (TOKEN, Namespace, child_env, family, free_port, kill_all,  # noqa: E402
                           serve_cmd, start, stop, wait_healthy)
from serve_helpers import call as ns_call  # noqa: E402

MAX_BATCH, MAX_QUEUE = 4, 4
STOP_WITHIN_S = 15
NS: list[Namespace] = []  # the module's namespace, while its fixture is up


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """A request made from inside the module's namespace (where the server's 127.0.0.1 is)."""
    return ns_call(NS[0], url, body, headers, timeout)


@pytest.fixture(scope="module")
def namespace():
    ns = Namespace()
    NS.append(ns)
    try:
        yield ns
    finally:
        NS.clear()
        ns.close()


@pytest.fixture(scope="module")
def server(exported, namespace, tmp_path_factory):
    """``apla-rt serve`` on 127.0.0.1 (from noise, batches of up to 4 gathered for 300 ms):
    (base URL, engine folder, the server's process, its log)."""
    _, folder = exported
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    (tmp / "home").mkdir()
    env = child_env(tmp / "home", RAY_AUTH_TOKEN=TOKEN)
    log = tmp / "serve.log"
    proc, out = start(namespace, serve_cmd(folder, port, "--max-batch", str(MAX_BATCH), "--batch-wait-ms",
                                           "300", "--max-queue", str(MAX_QUEUE), "--from-noise",
                                           "--threads", "1", "--num-cpus", "0.5",
                                           # ONNX Runtime, as the library it is compared with
                                           "--backend", "ort-cpu"), env, log)
    members: list = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(namespace, url, proc, log)
        members = family(proc)
        yield url, folder, proc, log
    finally:
        stop(proc)
        kill_all(members)
        out.close()


@pytest.fixture(scope="module")
def library(exported):
    from apla_rt import Pipeline

    _, folder = exported
    with Pipeline.open(folder, "ort", threads=1) as pipe:
        yield pipe


def test_response_equals_the_library(server, library):
    url = server[0]
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
    url = server[0]
    prompts = ["a man is skiing", "a panda is skiing", "a man", "a dog is skiing"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: call(url + "/generate", {"prompt": prompts[i], "seed": i,
                                                                   "steps": 2, "format": "gif"}), range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert max(int(r[1]["x-apla-batch-size"]) for r in results) > 1
    from apla_rt.media.video import read_video

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
    url, folder = server[0], server[1]
    long_prompt = "ski " * 100
    cases: list[tuple[dict | bytes, str]] = [
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
    url = server[0]
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


SLOW_STEPS = 250  # a request that runs for seconds on the tiny engine


def test_a_replica_killed_mid_request_is_replaced_and_the_request_retried(server, library):
    """The replica is killed (SIGKILL) while a request runs in it: Serve replaces it, and the
    ingress sends the request once more, so its client gets the video it asked for (the same
    as the library's for its seed), marked ``X-Apla-Retried: 1``; later requests succeed."""
    url = server[0]
    body = {"prompt": "a man", "seed": 7, "steps": SLOW_STEPS, "format": "gif"}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, url + "/generate", body, {"X-Apla-Timeout-S": "120"}, 150)
        info: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pending.done():
            info = json.loads(call(url + "/info")[2])
            if info["in_flight"] >= 1:
                break
            time.sleep(0.2)
        assert info.get("in_flight", 0) >= 1 and not pending.done(), info
        assert len(info["in_flight_s"]) == info["in_flight"] and 0 <= info["in_flight_s"][0] < 30, info
        os.kill(info["pid"], signal.SIGKILL)
        status, headers, data = pending.result()
    assert status == 200 and headers.get("x-apla-retried") == "1", (status, headers, data[:300])
    assert headers["x-apla-seed"] == "7"
    want, = library.generate("a man", seeds=7, from_noise=True, steps=SLOW_STEPS)
    assert data == want.encode("gif")
    assert json.loads(call(url + "/info")[2])["pid"] != info["pid"]
    assert all(call(url + "/generate", {"prompt": "a man", "seed": s, "steps": 1})[0] == 200 for s in (2, 3))


def _stops_leaving_nothing(proc: subprocess.Popen, log: Path, sig: int, group: bool) -> None:
    members = family(proc)
    assert len(members) > 3, members  # the server and Ray's processes
    started = time.monotonic()
    try:
        if group:
            os.killpg(proc.pid, sig)  # what systemd's KillMode=control-group does
        else:
            proc.send_signal(sig)
        rc = proc.wait(timeout=STOP_WITHIN_S)
        _, alive = psutil.wait_procs(members, timeout=max(0.1, STOP_WITHIN_S - (time.monotonic() - started)))
        took = time.monotonic() - started
        left = [(p.pid, p.name()) for p in alive if p.is_running()]
    finally:
        kill_all(members)
    assert not left and took <= STOP_WITHIN_S and rc == 0, (left, took, rc, log.read_text()[-3000:])
    text = log.read_text()
    assert "Traceback" not in text and "stopping" in text, text[-3000:]


def test_sigterm_to_the_whole_group_stops_the_shared_server_leaving_no_process(server):
    """Last of the module's server's tests: it stops that server (the case that hung before)."""
    _, _, proc, log = server
    _stops_leaving_nothing(proc, log, signal.SIGTERM, group=True)


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False)], ids=["SIGTERM-main"])
def test_the_cli_server_stops_on_a_signal_leaving_no_process(exported, namespace, tmp_path, sig, group):
    """The graceful path (Serve and Ray shut down in turn). SIGINT and SIGTERM share one
    handler; SIGINT to the whole group (Ctrl-C) takes the group path tested above and is left
    out here to save a server start (add ``(signal.SIGINT, True)`` to run it)."""
    _, folder = exported
    port = free_port()
    (tmp_path / "home").mkdir()
    env = child_env(tmp_path / "home", RAY_AUTH_TOKEN=TOKEN)
    log = tmp_path / "serve.log"
    proc, out = start(namespace, serve_cmd(folder, port, "--max-batch", "2", "--num-cpus", "0.5"), env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(namespace, url, proc, log)
        assert call(url + "/generate", {"prompt": "a man", "steps": 1})[0] == 200
        _stops_leaving_nothing(proc, log, sig, group)
    finally:
        stop(proc)
        out.close()
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob("*.gif"))  # nothing written
