"""``serve deploy`` (Ray's command, through the head's dashboard REST API) takes the file
``apla-rt serve --print-config`` prints unchanged: on a one-node cluster of this test's own
(``ray start --block --head`` with its dashboard on 127.0.0.1, token authentication on, in a
network namespace of its own), the deployed app answers a request, and ``serve shutdown``
removes it; the test ends the node by pid."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

from conftest import require

require("ray.serve")
require("psutil")

from serve_helpers import (TOKEN, Namespace, call, child_env, family, free_port, kill_all,  # noqa: E402
                           printed_config, ray_node, stop, wait_healthy)


def test_serve_deploy_takes_the_printed_config(exported, tmp_path):
    _, folder = exported
    serve_bin = shutil.which("serve")
    assert serve_bin, "Ray's serve command is not installed"
    ns = Namespace()
    (tmp_path / "home").mkdir()
    env = child_env(tmp_path / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    gcs, dashboard, port = free_port(), free_port(), free_port()
    head, log = ray_node(ns, env, tmp_path / "head.log", head_port=gcs, num_cpus=2, dashboard_port=dashboard)
    members: list = []
    try:
        config = printed_config(folder, port, tmp_path)
        address = f"http://127.0.0.1:{dashboard}"
        deployed = None
        deadline = time.monotonic() + 90  # the dashboard's REST API comes up after the node
        while time.monotonic() < deadline:
            deployed = subprocess.run(ns.wrap([serve_bin, "deploy", str(config), "--address", address]),
                                      env=env, capture_output=True, text=True, timeout=60)
            if deployed.returncode == 0:
                break
            time.sleep(2)
        assert deployed is not None and deployed.returncode == 0, (deployed.stdout, deployed.stderr[-2000:])
        members = family(head)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(ns, url, head, tmp_path / "head.log")
        status, headers, body = call(ns, url + "/generate", {"prompt": "a panda", "seed": 5, "steps": 1,
                                                             "format": "gif"})
        assert status == 200 and headers["content-type"] == "image/gif" and body[:3] == b"GIF", body[:200]
        down = subprocess.run(ns.wrap([serve_bin, "shutdown", "-y", "--address", address]), env=env,
                              capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, down.stderr[-2000:]
    finally:
        members = members or family(head)
        stop(head, signal.SIGTERM, seconds=10)
        kill_all(members + family(head))
        log.close()
        ns.close()
