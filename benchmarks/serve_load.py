"""Load test of ``apla-rt serve``: throughput and latency, batching off vs on, 1 replica vs 2.

    python benchmarks/serve_load.py --engine-dir engines/ski --requests 16 --concurrency 1 4 8
    python benchmarks/serve_load.py --engine-dir engines/ski --max-batch 4 --replicas 1 2 \
        --cores 2 --concurrency 4      # 1 replica of 2 threads vs 2 replicas of 1 thread

With ``--replicas`` (several counts) there is one app per (max batch, replica count), at
/b{B}r{R}; ``--cores C`` gives each replica of an R-replica app C // R ONNX Runtime threads,
so that every app uses the same cores.

Starts a local Ray instance (``--num-cpus``, default 2) and one serve app per ``--max-batch``
value (default 1 and 4, at /b1 and /b4 on 127.0.0.1, one replica each, idle while the other
is measured); warms each up, then for each concurrency sends ``--requests`` POST /generate
requests (from noise, seeds 0..N-1) through a bounded thread pool to each app in turn,
``--rounds`` times, alternating so that load from elsewhere on the machine falls on both
alike. Reports videos/min, p50/p95 latency and failed requests per point (the best round's
throughput, and every round in the JSON), then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import socket
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _post(url: str, body: dict, timeout: float) -> tuple[int, float, int]:
    """(status, seconds, batch size) of one request."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"),
                                    timeout=timeout) as r:
            r.read()
            return r.status, time.perf_counter() - start, int(r.headers.get("X-Apla-Batch-Size", 0))
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - start, 0
    except OSError:
        return 0, time.perf_counter() - start, 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load(url: str, requests: int, concurrency: int, steps: int | None, timeout: float) -> dict:
    def one(i: int) -> tuple[int, float, int]:
        body = {"prompt": "a man is skiing", "seed": i}
        if steps is not None:
            body["steps"] = steps
        return _post(url, body, timeout)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    latencies = [r[1] for r in ok]
    return {"concurrency": concurrency, "requests": requests, "failed": requests - len(ok),
            "seconds": round(wall, 3), "videos_per_min": round(60 * len(ok) / wall, 2),
            "p50_s": round(_percentile(latencies, 0.5), 3) if ok else None,
            "p95_s": round(_percentile(latencies, 0.95), 3) if ok else None,
            "mean_batch": round(statistics.mean(r[2] for r in ok), 2) if ok else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, type=Path)
    p.add_argument("--requests", type=int, default=16, help="requests per point (bounded)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--replicas", type=int, nargs="+", default=[1], help="replica counts to compare")
    p.add_argument("--cores", type=int, help="cores per app, shared by its replicas' threads")
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--steps", type=int, help="DDIM steps per video (default: the run's)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per replica (default: its own)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per point")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if (not 1 <= args.requests <= 1000 or not all(1 <= c <= 64 for c in args.concurrency)
            or not 1 <= args.rounds <= 10):
        p.error("--requests must be in 1..1000, --concurrency in 1..64, --rounds in 1..10")

    import ray
    from ray import serve

    from apla_rt.service.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    apps = [(b, r) for b in args.max_batch for r in args.replicas]
    ray.init(address="local", num_cpus=args.num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             object_store_memory=100 * 1024**2, logging_level=logging.ERROR, log_to_driver=False)
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for max_batch, replicas in apps:
            threads = max(1, args.cores // replicas) if args.cores else args.threads
            serve.run(build_app({"engine_dir": str(args.engine_dir.resolve()), "max_batch": max_batch,
                                 "batch_wait_ms": args.batch_wait_ms, "max_queue": max(args.concurrency),
                                 "from_noise": True, "threads": threads, "timeout_s": args.timeout,
                                 "replicas": replicas,
                                 "num_cpus": args.num_cpus / sum(r for _, r in apps)}),
                      name=f"b{max_batch}r{replicas}", route_prefix=f"/b{max_batch}r{replicas}")
            load(f"{base}/b{max_batch}r{replicas}/generate", 2 * replicas, replicas, args.steps,
                 args.timeout)  # warm-up
        for concurrency in args.concurrency:
            rounds: dict[tuple[int, int], list[dict]] = {app: [] for app in apps}
            for _ in range(args.rounds):
                for max_batch, replicas in apps:
                    rounds[max_batch, replicas].append(load(f"{base}/b{max_batch}r{replicas}/generate",
                                                            args.requests, concurrency, args.steps,
                                                            args.timeout))
            for (max_batch, replicas), runs in rounds.items():
                best = max(runs, key=lambda r: r["videos_per_min"])
                point = {"max_batch": max_batch, "replicas": replicas, **best,
                         "failed": sum(r["failed"] for r in runs), "rounds": runs}
                results.append(point)
                print(f"max-batch {max_batch} replicas {replicas}  concurrency {concurrency}: "
                      f"{point['videos_per_min']:7.2f} "
                      f"videos/min (rounds: {', '.join(str(r['videos_per_min']) for r in runs)}), "
                      f"p50 {point['p50_s']} s, p95 {point['p95_s']} s, mean batch "
                      f"{point['mean_batch']}, failed {point['failed']}/{args.requests * args.rounds}",
                      flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    for c in args.concurrency:
        for r in args.replicas:
            by = {x["max_batch"]: x["videos_per_min"] for x in results if x["concurrency"] == c
                  and x["replicas"] == r}
            if 1 in by and len(by) > 1 and by[1]:
                print(f"concurrency {c}, {r} replica(s): " + ", ".join(
                    f"max-batch {b}: {v / by[1]:.2f}x" for b, v in by.items() if b != 1))
        for b in args.max_batch:
            per = {x["replicas"]: x["videos_per_min"] for x in results if x["concurrency"] == c
                   and x["max_batch"] == b}
            if len(per) > 1 and per.get(min(per)):
                print(f"concurrency {c}, max-batch {b}: " + ", ".join(
                    f"{r} replicas: {v / per[min(per)]:.2f}x" for r, v in per.items() if r != min(per)))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": platform.platform(), "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
