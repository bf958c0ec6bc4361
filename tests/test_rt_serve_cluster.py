"""``apla-rt serve --address`` on a real two-node Ray cluster on this machine: a head and a
worker node (``ray start --block``, node address 127.0.0.1, each with its own temp dir, token
authentication on), started and stopped by pid by this module, in a network namespace of its
own together with every client (tests/serve_helpers.py). In order, on one cluster:

* a wrong token is refused with one line naming the variable to set;
* the server joins with only ``RAY_AUTH_TOKEN`` set, serves, and its two replicas land on both
  nodes; the worker node is then killed (every process of it, SIGKILL) under a bounded load:
  every request is answered within its timeout (200, a request that was in the lost replica
  retried by the ingress, or an error status with a one-line JSON body), Serve restarts the
  lost replica on the head, later requests succeed; the figures are printed
  (docs/reliability.md); SIGINT stops the server and leaves the head running;
* ``serve run`` on ``apla-rt serve --print-config``'s file serves a request on that cluster.

The head declares a node dead after 3 missed health checks 1 s apart (Ray's default: 5, 3 s
apart), so the test does not wait on Ray's default detection time; and Serve's proxy (on the head
only: both nodes share 127.0.0.1 here) spreads requests over both nodes' replicas.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import require

require("ray.serve")
psutil = require("psutil")

from serve_helpers import (TOKEN, Namespace, call, child_env, family, free_port, kill_all,  # noqa: E402
                           printed_config, ray_node, serve_cmd, start, stop, wait_healthy)

HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
          "RAY_health_check_failure_threshold": "3",
          # Serve's proxy prefers replicas on its own node; with the one proxy on the head that
          # would send every request to the head's replica, and losing the worker would test little
          "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
LOAD_CLIENTS, REQUEST_TIMEOUT_S = 3, 30
LOAD_STEPS = 60  # long enough that the worker's replica is caught with a request in it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(namespace, head address, head process, worker process, a tmp folder, Serve's port)."""
    ns = Namespace()
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "home").mkdir()
    node_env = child_env(tmp / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, **HEALTH)
    gcs = free_port()
    head, head_log = ray_node(ns, node_env, tmp / "head.log", head_port=gcs, num_cpus=2)
    members = []
    worker = worker_log = None
    try:
        address = f"127.0.0.1:{gcs}"
        worker, worker_log = ray_node(ns, node_env, tmp / "worker.log", join=address, num_cpus=1)
        _wait_for_nodes(ns, tmp, address, 2)
        members = family(head) + family(worker)
        yield ns, address, head, worker, tmp, free_port()
    finally:
        for proc in (worker, head):
            if proc is not None:
                stop(proc, seconds=5)
        kill_all(members)
        for out in (head_log, worker_log):
            if out is not None:
                out.close()
        ns.close()


def _wait_for_nodes(ns: Namespace, tmp, address: str, count: int, seconds: float = 90) -> None:
    """Until the cluster has ``count`` live nodes (asked by a driver of its own in ``ns``)."""
    code = ("import ray, sys, time\nray.init(address=sys.argv[1], logging_level='ERROR')\n"
            "end = time.monotonic() + float(sys.argv[3])\n"
            "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.monotonic() < end:\n"
            "    time.sleep(0.5)\nprint(sum(n['Alive'] for n in ray.nodes()))\n")
    env = child_env(tmp / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    done = subprocess.run(ns.wrap([sys.executable, "-c", code, address, str(count), str(seconds)]),
                          env=env, capture_output=True, text=True, timeout=seconds + 60)
    assert done.stdout.strip().splitlines()[-1:] == [str(count)], (done.stdout, done.stderr[-2000:])


def test_a_wrong_token_is_one_line(cluster, exported):
    ns, address, *_ , tmp, port = cluster
    _, folder = exported
    env = child_env(tmp / "home", RAY_AUTH_TOKEN="not-the-cluster-token",
                    RAY_gcs_server_port_wait_time_s="3")  # Ray's retries, shortened for the test
    done = subprocess.run(ns.wrap(serve_cmd(folder, port, "--address", address)), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: the Ray cluster at {address} refused the authentication "
                               "token from RAY_AUTH_TOKEN; set RAY_AUTH_TOKEN"), lines


def _info(ns: Namespace, url: str) -> tuple[int, str]:
    info = json.loads(call(ns, url + "/info", timeout=10)[2])
    return info["pid"], info["node_id"]


def _busy_on(ns: Namespace, url: str, pids: set[int], young_s: float, seconds: float = 20) -> bool:
    """Until a replica among ``pids`` answers /info with a request that has been in it for at
    most ``young_s`` (bounded): killed at once, it still holds that request."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            info = json.loads(call(ns, url + "/info", timeout=10)[2])
        except (OSError, ValueError, subprocess.TimeoutExpired):
            continue
        if info["pid"] in pids and info["in_flight_s"] and min(info["in_flight_s"]) <= young_s:
            return True
    return False


def _replicas(ns: Namespace, url: str, want: int, tries: int = 30) -> dict[int, str]:
    """pid -> node id of the replicas seen by up to ``tries`` /info calls (until ``want``)."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        try:
            pid, node = _info(ns, url)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            time.sleep(0.5)
            continue
        seen[pid] = node
        if len(seen) >= want:
            break
    return seen


def test_joins_spreads_over_both_nodes_and_survives_losing_one(cluster, exported):
    ns, address, head, worker, tmp, port = cluster
    _, folder = exported
    env = child_env(tmp / "home", RAY_AUTH_TOKEN=TOKEN)  # no RAY_AUTH_MODE: apla-rt turns it on
    log = tmp / "join.log"
    server, out = start(ns, serve_cmd(folder, port, "--address", address, "--replicas", "2",
                                      "--num-cpus", "1", "--threads", "1", "--max-batch", "2",
                                      "--from-noise", "--proxy-location", "HeadOnly",
                                      "--timeout-s", str(REQUEST_TIMEOUT_S)), env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(ns, url, server, log)
        assert call(ns, url + "/generate", {"prompt": "a man is skiing", "seed": 1, "steps": 1})[0] == 200
        before = _replicas(ns, url, 2)
        assert len(before) == 2 and len(set(before.values())) == 2, before  # one replica per node
        sent = time.monotonic()  # one load request alone: a lower bound on one under load
        assert call(ns, url + "/generate", {"prompt": "a man is skiing", "seed": 2,
                                            "steps": LOAD_STEPS})[0] == 200
        figures = _lose_the_worker_under_load(ns, url, worker, before, time.monotonic() - sent)
        print("node loss:", json.dumps(figures))
        (tmp / "node-loss.json").write_text(json.dumps(figures))
        assert figures["unanswered"] == 0, figures
        assert figures["failed_one_line"] and figures["failed_json"], figures  # the ingress's errors
        assert figures["killed_while_busy"], figures
        # the request that was in the lost replica: sent again by the ingress, or a JSON error
        assert figures["retried"] + figures["failed"] >= 1, figures
        assert figures["recovered_s"] is not None, figures
        later = [call(ns, url + "/generate", {"prompt": "a man", "seed": s, "steps": 1})[0] for s in range(4)]
        assert later == [200] * 4, later
        after = _replicas(ns, url, 2)
        head_node = set(before.values()) - {figures["lost_node"]}
        assert len(after) == 2 and set(after.values()) == head_node, (before, after)

        members = family(server)
        started = time.monotonic()
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(15) == 0, log.read_text()[-3000:]
        assert time.monotonic() - started <= 15
        _, alive = psutil.wait_procs([p for p in members if p.pid != server.pid], timeout=5)
        assert not alive, alive
        assert "Traceback" not in log.read_text()
        assert head.poll() is None and any(p.name() == "raylet" for p in family(head))  # still up
        try:  # its application is gone (Serve's proxy, part of the cluster, may still answer)
            assert call(ns, url + "/healthz", timeout=10)[0] == 404
        except OSError:
            pass
        _wait_for_nodes(ns, tmp, address, 1)
    finally:
        stop(server)
        out.close()


def _lose_the_worker_under_load(ns: Namespace, url: str, worker: subprocess.Popen,
                                before: dict[int, str], alone_s: float) -> dict:
    """Kill every process of the worker node while LOAD_CLIENTS clients keep requesting; each
    request is bounded by its timeout header (``alone_s``: one load request's time alone).
    Returns what was answered, how, and when the lost replica was back (a new replica pid seen
    on /info)."""
    results: list[dict] = []
    stop_load = threading.Event()
    killed_at: list[float] = []
    recovered_at: list[float] = []

    def client(i: int) -> None:
        for n in range(40):  # bounded in count as in time
            if stop_load.is_set():
                return
            sent = time.monotonic()
            record: dict[str, Any] = {"client": i, "sent": sent}
            try:
                status, headers, body = call(ns, url + "/generate",
                                             {"prompt": "a man is skiing", "seed": 100 * i + n,
                                              "steps": LOAD_STEPS},
                                             headers={"X-Apla-Timeout-S": str(REQUEST_TIMEOUT_S)},
                                             timeout=REQUEST_TIMEOUT_S + 15)
                record.update(status=status, seconds=time.monotonic() - sent,
                              retried=headers.get("x-apla-retried") == "1")
                if status != 200:
                    text = body.decode(errors="replace").strip()
                    record.update(one_line="\n" not in text, body=text[:200])
                    try:
                        record["json_error"] = isinstance(json.loads(text).get("error"), str)
                    except (ValueError, AttributeError):
                        record["json_error"] = False
            except (OSError, subprocess.TimeoutExpired) as err:
                record.update(status=None, seconds=time.monotonic() - sent, error=str(err)[:200])
            results.append(record)

    lost_node = None
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(LOAD_CLIENTS)]
        time.sleep(4)  # the load is under way
        worker_members = family(worker)
        worker_replicas = {p.pid for p in worker_members} & set(before)
        # the kill comes while the worker's replica holds a request that came in at most a third
        # of a request's time ago: two thirds of its work are left, far more than /info's answer
        # and the kill take (a request that ends between /info and the kill would leave nothing
        # in the lost replica; CI saw that twice when the check was any request in flight, then
        # the process seen computing); the replica is killed first, at once
        replica = next(p for p in worker_members if p.pid in worker_replicas)
        busy = _busy_on(ns, url, worker_replicas, alone_s / 3)
        worker_nodes = set()
        killed_at.append(time.monotonic())
        kill_all([replica, *(p for p in worker_members if p.pid != replica.pid)])  # no process survives
        deadline = killed_at[0] + 90
        while time.monotonic() < deadline and not recovered_at:
            try:
                pid, node = _info(ns, url)
                if pid not in before:
                    recovered_at.append(time.monotonic())
                    worker_nodes = {n for p, n in before.items() if n != node}
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            time.sleep(1)
        lost_node = next(iter(worker_nodes), None)
        time.sleep(3)  # some requests after the recovery
        stop_load.set()
        for f in futures:
            f.result()
    after_kill = [r for r in results if r["sent"] + r["seconds"] >= killed_at[0]]
    failed = [r for r in results if r.get("status") != 200]
    return {"requests": len(results), "answered": sum(r["status"] is not None for r in results),
            "unanswered": sum(r["status"] is None for r in results),
            "ok": sum(r.get("status") == 200 for r in results),
            "failed": len(failed), "failed_statuses": sorted({str(r.get("status")) for r in failed}),
            "failed_bodies": sorted({r.get("body", r.get("error", ""))[:120] for r in failed}),
            "failed_one_line": all(r.get("one_line", False) for r in failed),
            "failed_json": all(r.get("json_error", False) for r in failed),
            "retried": sum(r.get("retried", False) for r in results),
            "answered_after_kill": len(after_kill),
            "slowest_s": round(max(r["seconds"] for r in results), 2),
            "recovered_s": round(recovered_at[0] - killed_at[0], 1) if recovered_at else None,
            "lost_node": lost_node, "killed_while_busy": busy, "alone_s": round(alone_s, 2)}


def test_serve_run_on_the_printed_config_serves(cluster, exported):
    ns, address, head, _, tmp, port = cluster
    _, folder = exported
    serve_bin = shutil.which("serve")
    assert serve_bin, "Ray's serve command is not installed"
    config = printed_config(folder, port, tmp)
    env = child_env(tmp / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    log = tmp / "serve-run.log"
    proc, out = start(ns, [serve_bin, "run", str(config), "--address", address], env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(ns, url, proc, log)
        status, headers, body = call(ns, url + "/generate", {"prompt": "a panda", "seed": 5, "steps": 1,
                                                             "format": "gif"})
        assert status == 200 and headers["content-type"] == "image/gif" and body[:3] == b"GIF", body[:200]
        info = json.loads(call(ns, url + "/info")[2])
        assert info["serve"]["from_noise"] is True and info["serve"]["max_batch"] == 2
    finally:
        stop(proc, signal.SIGINT)
        out.close()
    assert head.poll() is None
