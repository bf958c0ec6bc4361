"""``apla-rt serve``: the ``Pipeline`` behind HTTP on Ray Serve (``pip install -e ".[serve]"``).

One deployment (``AplaServer``); each replica opens one ``Pipeline`` and answers

    POST /generate   JSON {"prompt", "seed"?, "frames"?, "steps"?, "guidance"?,
                     "negative_prompt"?, "scheduler"?: "ddim" | "dpmpp-2m" | "unipc",
                     "guidance_interval"?: [lo, hi] | "lo:hi", "cache_interval"?,
                     "cache_schedule"?, "format"?: "mp4" | "gif"} -> the video's bytes,
                     headers X-Apla-Seed and X-Apla-Batch-Size
    GET  /healthz    200 once the replica's pipeline is open
    GET  /info       the engine folder's summary (JSON)

``@serve.batch`` gathers concurrent requests (up to ``max_batch``, waiting at most
``batch_wait_ms`` for more) into one ``Pipeline.run`` on a worker thread. Bad input is a
400 with the CLI's one-line message; more than ``max_queue`` requests waiting on a replica
is a 503 with ``Retry-After``; a request that outlives its timeout (``timeout_s``, or the
smaller ``X-Apla-Timeout-S`` header) is a 504. Videos are encoded in memory: the server
writes nothing to disk. ``build_app`` is also the import path for ``serve run`` with a
config file (docs/serving.md); ``serve_config`` writes that file (``--print-config``), and
``run_server`` joins a cluster or starts a local instance through ``apla_rt.raycluster``.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from .api import Pipeline, Request, Video
from .cpu_precision import check_precision
from .errors import AplaError, InputError
from .request_fields import CONTENT_TYPES, decode_object, parse_request

APP_NAME = "apla"
MAX_BODY_BYTES = 64 * 1024
TIMEOUT_HEADER = "x-apla-timeout-s"


@dataclass(frozen=True)
class ServeOptions:
    """What ``apla-rt serve`` configures; ``build_app`` takes the same keys as a dict."""

    engine_dir: str
    replicas: int = 1
    max_batch: int = 4
    batch_wait_ms: float = 20.0
    max_queue: int = 16
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    backend: str = "auto"
    threads: int | None = None
    from_noise: bool = False
    timeout_s: float = 300.0
    autoscaling_config: dict[str, Any] | None = None  # Serve's; replaces ``replicas``
    precision: str = "auto"  # apla_rt.cpu_precision; /info says what ran

    def check(self) -> "ServeOptions":
        for name, value, low in (("--replicas", self.replicas, 1), ("--max-batch", self.max_batch, 1),
                                 ("--max-queue", self.max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, number, positive in (("--batch-wait-ms", self.batch_wait_ms, False),
                                       ("--num-gpus", self.num_gpus, False),
                                       ("--num-cpus", self.num_cpus, False),
                                       ("--timeout-s", self.timeout_s, True)):
            if (isinstance(number, bool) or not isinstance(number, (int, float))
                    or not math.isfinite(number) or number < 0 or (positive and number == 0)):
                raise InputError(f"{name} must be a {'positive' if positive else 'non-negative'} "
                                 f"number, got {number!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"--threads must be at least 1, got {self.threads!r}")
        check_precision(self.precision)
        return self


def parse_generate(body: bytes, pipe: Pipeline, from_noise: bool) -> tuple[Request, str]:
    """A /generate body -> (checked Request, format); ``InputError`` with the CLI's message.
    A request without a seed gets a random one (reported in ``X-Apla-Seed``)."""
    if len(body) > MAX_BODY_BYTES:
        raise InputError(f"the request body is larger than {MAX_BODY_BYTES} bytes")
    request, fmt = parse_request(decode_object(body, "the request body"))
    pipe.check(request, from_noise=from_noise)
    return request, fmt


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


@serve.deployment(name="AplaServer")
class AplaServer:
    """One replica: an open ``Pipeline`` and the batching queue in front of it."""

    def __init__(self, options: dict[str, Any]):
        self.settings = ServeOptions(**options).check()
        o = self.settings
        self.pipe = Pipeline.open(o.engine_dir, o.backend, o.threads, max_batch=o.max_batch,
                                  precision=o.precision)
        batcher: Any = self.generate_batch  # Serve's batch wrapper
        batcher.set_max_batch_size(o.max_batch)
        batcher.set_batch_wait_timeout_s(o.batch_wait_ms / 1000.0)
        self.node_id = _node_id()
        self.in_flight = 0  # accepted /generate requests not yet answered
        self.batch_seconds = 1.0  # the last batch's duration, for Retry-After

    def check_health(self) -> None:
        """Serve's health check: the pipeline is open."""
        if not self.pipe.engine.runners:
            raise RuntimeError("the pipeline is closed")

    async def __call__(self, http: HttpRequest) -> Response:
        path, method = http.url.path, http.method
        root = http.scope.get("root_path", "")  # the app's route prefix
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/") or "/"
        if path == "/healthz" and method == "GET":
            return JSONResponse({"ok": True})
        if path == "/info" and method == "GET":
            return JSONResponse({**self.pipe.summary(), "pid": os.getpid(), "node_id": self.node_id,
                                 "serve": asdict(self.settings)})
        if path == "/generate" and method == "POST":
            return await self._generate(http)
        if path in ("/healthz", "/info", "/generate"):
            return _error(405, f"{method} is not allowed on {path}")
        return _error(404, f"no route {path}; use POST /generate, GET /healthz or GET /info")

    async def _generate(self, http: HttpRequest) -> Response:
        o = self.settings
        if self.in_flight >= o.max_batch + o.max_queue:
            waits = math.ceil(self.in_flight / o.max_batch)
            retry = max(1, math.ceil(waits * self.batch_seconds))
            return _error(503, f"{self.in_flight} requests are already waiting on this replica "
                               f"(--max-queue {o.max_queue}); retry in {retry} s",
                          {"Retry-After": str(retry)})
        self.in_flight += 1
        try:
            try:
                timeout = self._timeout(http)
                request, fmt = parse_generate(await http.body(), self.pipe, o.from_noise)
            except AplaError as err:
                return _error(400, str(err))
            try:
                video = await asyncio.wait_for(self.generate_batch(request), timeout)
            except asyncio.TimeoutError:
                return _error(504, f"the video took longer than the request's timeout of {timeout:g} s")
            data = await asyncio.to_thread(video.encode, fmt)
            return Response(data, media_type=CONTENT_TYPES[fmt],
                            headers={"X-Apla-Seed": str(video.seed),
                                     "X-Apla-Batch-Size": str(video.batch_size)})
        finally:
            self.in_flight -= 1

    def _timeout(self, http: HttpRequest) -> float:
        timeout = self.settings.timeout_s
        given = http.headers.get(TIMEOUT_HEADER)
        if given is not None:
            try:
                value = float(given)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"the X-Apla-Timeout-S header must be a positive number of "
                                 f"seconds, got {given!r}")
            timeout = min(timeout, value)
        return timeout

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def generate_batch(self, requests: list[Request]) -> list[Video]:
        started = time.perf_counter()
        videos = await asyncio.to_thread(self.pipe.run, requests, from_noise=self.settings.from_noise)
        self.batch_seconds = time.perf_counter() - started
        return videos


def _node_id() -> str | None:
    """The Ray node this replica runs on (``GET /info``), where Ray says."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


def deployment_options(o: ServeOptions) -> dict[str, Any]:
    """The ``AplaServer`` deployment's Serve options for ``o``: what ``build_app`` applies and
    ``--print-config`` writes under ``deployments``."""
    actor: dict[str, Any] = {"num_cpus": o.num_cpus}
    if o.num_gpus:
        actor["num_gpus"] = o.num_gpus
    scale: dict[str, Any] = ({"autoscaling_config": o.autoscaling_config} if o.autoscaling_config
                             else {"num_replicas": o.replicas})
    # The replica answers 503 itself beyond max_batch + max_queue (with Retry-After), so Serve
    # forwards a little more than that to it; Serve's own queue at the proxy is a second bound
    # (its 503 has no Retry-After) that only a flood of that many requests per replica reaches.
    ongoing = o.max_batch + o.max_queue + 8
    replicas = (o.autoscaling_config or {}).get("max_replicas", o.replicas)
    return {**scale, "ray_actor_options": actor, "max_ongoing_requests": ongoing,
            "max_queued_requests": ongoing * int(replicas)}


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``ServeOptions(**args)`` (also ``serve run``'s import path:
    ``apla_rt.serve:build_app``)."""
    o = ServeOptions(**args).check()
    return AplaServer.options(**deployment_options(o)).bind(asdict(o))  # type: ignore[attr-defined]


def serve_config(options: ServeOptions, host: str, port: int,
                 proxy_location: str = "EveryNode") -> dict[str, Any]:
    """The Serve config file (``serve run`` / ``serve deploy`` / KubeRay's ``serveConfigV2``)
    that runs what ``apla-rt serve`` with the same options runs."""
    o = options.check()
    args = {k: v for k, v in asdict(o).items()
            if v != ServeOptions.__dataclass_fields__[k].default or k == "engine_dir"}
    return {"proxy_location": proxy_location,
            "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/",
                              "import_path": "apla_rt.serve:build_app", "args": args,
                              "deployments": [{"name": "AplaServer", **deployment_options(o)}]}]}


def run_server(options: ServeOptions, host: str, port: int, log: Callable[[str], None],
               ready: Callable[[], None] | None = None, address: str | None = None,
               proxy_location: str = "EveryNode") -> None:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``; see ``apla_rt.raycluster``) or
    start a local Ray instance, run the app on ``host:port`` and block until SIGINT or SIGTERM.
    Then delete the app (a cluster joined keeps running) or, on a local instance, stop Serve and
    Ray and end whatever process of theirs is left: within ``STOP_SECONDS`` in all, also when
    the signal reached Ray's processes too (a whole process group stopped at once)."""
    from . import raycluster

    options.check()
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    connection: raycluster.RayConnection | None = None
    ray_processes: list[Any] = []
    try:
        connection = raycluster.connect(address)
        for sig in signals:  # ray.init may have installed its own handlers
            signal.signal(sig, lambda *_: stop.set())
        if stop.is_set():
            return
        serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
        if not stop.is_set():
            serve.run(build_app(asdict(options)), name=APP_NAME, route_prefix="/", blocking=False)
        where = f"the Ray cluster at {connection.address}" if connection.address else "a local Ray instance"
        log(f"serving {options.engine_dir} on http://{host}:{port} (POST /generate, GET /healthz, "
            f"GET /info) on {where}; {options.replicas} replica(s), batches of up to "
            f"{options.max_batch}; Ctrl-C stops")
        if ready is not None:
            ready()
        ray_processes = _descendants()  # to tell, at the stop, whether a signal reached them too
        while not stop.wait(0.5):
            pass
        log("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if connection is not None:
            _stop(connection, log, ray_processes)


STOP_SECONDS = 12.0  # the most a stop takes before what is left of a local instance is killed


def _stop(connection: Any, log: Callable[[str], None], ray_processes: list[Any]) -> None:
    """Delete the app (joined) or shut Serve down (local), then leave Ray, each step bounded.
    A signal to the whole process group (systemd's default) also reaches Ray's own processes:
    once the raylet is gone Serve's and Ray's calls wait on it forever, so then a local
    instance's processes that are left are ended by pid and this process exits at once
    (Ray's exit hook would wait on the raylet too)."""
    from . import raycluster

    deadline = time.monotonic() + STOP_SECONDS
    if not connection.started:
        if not _bounded(lambda: serve.delete(APP_NAME), deadline - 2.0):
            log(f"could not delete the application {APP_NAME!r} in time; `serve status` on the "
                "cluster shows it, `serve delete` removes it")
        if not _bounded(lambda: raycluster.disconnect(connection), deadline):
            _exit_now(log)
        return
    time.sleep(0.5)  # a signal to the whole group has ended some of Ray's processes by now
    family = _descendants()
    clean = (_all_running(ray_processes) and _bounded(serve.shutdown, deadline - 6.0)
             and _bounded(lambda: raycluster.disconnect(connection), deadline - 4.0))
    _end(family + _descendants())
    if not clean:
        _exit_now(log)


def _exit_now(log: Callable[[str], None]) -> None:
    log("stopped (Ray's processes were already ending)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _all_running(processes: list[Any]) -> bool:
    """Whether every one of ``processes`` is still running (none ended, none a zombie)."""
    try:
        import psutil
    except ImportError:
        return True
    try:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    except psutil.Error:
        return False


def _bounded(step: Callable[[], Any], until: float) -> bool:
    """Run ``step`` on a daemon thread; whether it finished before the monotonic ``until``."""
    done = threading.Event()

    def run() -> None:
        try:
            step()
        except Exception:  # a cluster half gone: the rest of the stop still runs
            pass
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(max(0.0, until - time.monotonic()))


def _descendants() -> list[Any]:
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _end(processes: list[Any], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to those of ``processes`` still running."""
    if not processes:
        return
    import psutil

    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
