"""``apla-rt serve``: the ``Pipeline`` behind HTTP on Ray Serve (``pip install -e ".[serve]"``).

Two deployments: ``AplaServer``, whose replicas each open one ``Pipeline``, and ``AplaIngress``,
the HTTP ingress on the head node that holds no model and forwards every request to a replica
through Serve's handle. The app answers

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
smaller ``X-Apla-Timeout-S`` header) is a 504. A request whose replica is lost while it runs
(its process or node died) is sent once more to another replica within what is left of its
timeout (the answer then carries ``X-Apla-Retried: 1``), else it is a 503; every error is the
JSON ``{"error": "one line"}``. Videos are encoded in memory: the server writes nothing to disk. ``build_app`` is also the import path for ``serve run`` with a
config file (docs/serving.md); ``serve_config`` writes that file (``--print-config``), and
``run_server`` joins a cluster or starts a local instance through ``apla_rt.service.raycluster``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from ..api import Pipeline, Request, Video
from ..backends.placement import check_threads
from ..backends.precision import check_precision
from ..errors import AplaError, InputError
from .request_fields import CONTENT_TYPES, decode_object, parse_request

APP_NAME = "apla"
MAX_BODY_BYTES = 64 * 1024
TIMEOUT_HEADER = "x-apla-timeout-s"
RETRIED_HEADER = "X-Apla-Retried"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has 1 of it
RETRY_MIN_S = 1.0  # a lost request is retried only with at least this much of its timeout left
ANSWER_GRACE_S = 5.0  # what the ingress waits past a request's timeout for the replica's 504


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
    precision: str = "auto"  # apla_rt.backends.precision; /info says what ran
    exact: bool = False  # DDIM at the run's steps in fp32, not the setting tuned for the machine

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
        check_threads(self.threads)
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


@dataclass
class Reply:
    """An HTTP answer as a replica hands it to the ingress (plain data, through Ray)."""

    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, media_type=self.media_type,
                        headers=self.headers)


def _json(status: int, content: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(content).encode(), headers=dict(headers or {}))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return _json(status, {"error": " ".join(message.split())}, headers)


def _route(http: HttpRequest) -> str:
    """The request's path inside the app: its route prefix taken off, no trailing slash."""
    path = http.url.path
    root = http.scope.get("root_path", "")  # the app's route prefix
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def request_budget(timeout_s: float, given: str | None) -> float:
    """The seconds a request may take: ``timeout_s``, or the smaller ``X-Apla-Timeout-S``
    header (an unreadable header counts as absent here: the replica answers it with a 400)."""
    try:
        value = float(given) if given is not None else math.inf
    except ValueError:
        value = math.inf
    return min(timeout_s, value) if math.isfinite(value) and value > 0 else timeout_s


async def forward(send: Callable[[str | None], Any], timeout_s: float, given: str | None,
                  retries: int = 1, clock: Callable[[], float] = time.monotonic) -> Reply:
    """``send(timeout_header)`` to a replica (a Serve handle call) and its ``Reply``, bounded:
    a replica lost mid-request (``RayActorError``: its process or its node died) is retried
    ``retries`` times on another while at least ``RETRY_MIN_S`` of the request's time is left,
    the retry told the time that is left; then, or when Serve's queue is full, a 503 with
    ``Retry-After``; no answer ``ANSWER_GRACE_S`` past the deadline (the replica's own 504
    should come first) is a 504. Every error is the JSON one-line error."""
    budget = request_budget(timeout_s, given)
    deadline = clock() + budget
    lost = 0
    while True:
        response = send(given if lost == 0 else f"{max(deadline - clock(), 0.001):.3f}")
        try:
            reply: Reply = await asyncio.wait_for(_awaited(response), deadline - clock() + ANSWER_GRACE_S)
        except asyncio.TimeoutError:
            _cancel(response)
            return _error(504, f"no replica answered within the request's timeout of {budget:g} s")
        except BackPressureError as err:
            retry = max(1, math.ceil(err.retry_after_s or 1))
            return _error(503, f"every replica's queue is full ({err}); retry in {retry} s",
                          {"Retry-After": str(retry)})
        except (RayActorError, ReplicaUnavailableError):
            lost += 1
            if lost > retries or deadline - clock() < RETRY_MIN_S:
                again = " (and so was its retry)" if lost > 1 else ""
                return _error(503, "the replica serving this request was lost (its process or node "
                                   f"died){again}; Serve is replacing it; retry in 1 s", {"Retry-After": "1"})
            continue
        if lost:
            reply.headers[RETRIED_HEADER] = str(lost)
        return reply


async def _awaited(response: Any) -> Any:
    return await response


def _cancel(response: Any) -> None:
    cancel = getattr(response, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # the replica is gone or done: nothing left to cancel
            pass


@serve.deployment(name="AplaIngress")
class AplaIngress:
    """The app's HTTP ingress: no model, one replica on the head node (where Serve's controller
    and the cluster's control already live, so it is not lost with a worker node). It forwards
    each request to an ``AplaServer`` replica (``forward``) and turns a replica lost mid-request
    into a retry or a JSON error; without it, Serve's proxy answers such a request with its own
    plain-text 500."""

    def __init__(self, options: dict[str, Any], server: Any):
        self.settings = ServeOptions(**options).check()
        self.server = server  # a DeploymentHandle to AplaServer

    async def __call__(self, http: HttpRequest) -> Response:
        path, method = _route(http), http.method
        body = await http.body() if method == "POST" else b""
        reply = await forward(lambda header: self.server.answer.remote(path, method, body, header),
                              self.settings.timeout_s, http.headers.get(TIMEOUT_HEADER))
        return reply.response()


@serve.deployment(name="AplaServer")
class AplaServer:
    """One replica: an open ``Pipeline`` and the batching queue in front of it; it answers what
    ``AplaIngress`` forwards (``answer``)."""

    def __init__(self, options: dict[str, Any]):
        self.settings = ServeOptions(**options).check()
        o = self.settings
        self.pipe = Pipeline.open(o.engine_dir, o.backend, o.threads, max_batch=o.max_batch,
                                  precision=o.precision, exact=o.exact)
        batcher: Any = self.generate_batch  # Serve's batch wrapper
        batcher.set_max_batch_size(o.max_batch)
        batcher.set_batch_wait_timeout_s(o.batch_wait_ms / 1000.0)
        self.node_id = _node_id()
        self.accepted: dict[int, float] = {}  # accepted /generate requests not yet answered: when
        self.accepted_count = 0
        self.batch_seconds = 1.0  # the last batch's duration, for Retry-After

    def check_health(self) -> None:
        """Serve's health check: the pipeline is open."""
        if not self.pipe.engine.runners:
            raise RuntimeError("the pipeline is closed")

    async def answer(self, path: str, method: str, body: bytes, timeout_header: str | None) -> Reply:
        """One HTTP request, as the ingress forwards it (``path`` inside the app)."""
        if path == "/healthz" and method == "GET":
            return _json(200, {"ok": True})
        if path == "/info" and method == "GET":
            return _json(200, {**self.pipe.summary(), "pid": os.getpid(), "node_id": self.node_id,
                               "in_flight": self.in_flight, "in_flight_s": self.in_flight_ages(),
                               "serve": asdict(self.settings)})
        if path == "/generate" and method == "POST":
            return await self._generate(body, timeout_header)
        if path in ("/healthz", "/info", "/generate"):
            return _error(405, f"{method} is not allowed on {path}")
        return _error(404, f"no route {path}; use POST /generate, GET /healthz or GET /info")

    async def _generate(self, body: bytes, timeout_header: str | None) -> Reply:
        o = self.settings
        if self.in_flight >= o.max_batch + o.max_queue:
            waits = math.ceil(self.in_flight / o.max_batch)
            retry = max(1, math.ceil(waits * self.batch_seconds))
            return _error(503, f"{self.in_flight} requests are already waiting on this replica "
                               f"(--max-queue {o.max_queue}); retry in {retry} s",
                          {"Retry-After": str(retry)})
        self.accepted_count += 1
        key = self.accepted_count
        self.accepted[key] = time.monotonic()
        try:
            try:
                timeout = self._timeout(timeout_header)
                request, fmt = parse_generate(body, self.pipe, o.from_noise)
            except AplaError as err:
                return _error(400, str(err))
            try:
                video = await asyncio.wait_for(self.generate_batch(request), timeout)
            except asyncio.TimeoutError:
                return _error(504, f"the video took longer than the request's timeout of {timeout:g} s")
            data = await asyncio.to_thread(video.encode, fmt)
            return Reply(200, data, CONTENT_TYPES[fmt], {"X-Apla-Seed": str(video.seed),
                                                         "X-Apla-Batch-Size": str(video.batch_size)})
        finally:
            del self.accepted[key]

    @property
    def in_flight(self) -> int:
        """Accepted /generate requests not yet answered (running, batched or waiting)."""
        return len(self.accepted)

    def in_flight_ages(self) -> list[float]:
        """How long each request in flight has been in this replica, in seconds, oldest first
        (``GET /info``: a stuck request shows as an old one)."""
        now = time.monotonic()
        return sorted((round(now - t, 3) for t in self.accepted.values()), reverse=True)

    def _timeout(self, given: str | None) -> float:
        timeout = self.settings.timeout_s
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
    # forwards a little more than that to it; Serve's own queue in the ingress's handle is a
    # second bound that only a flood of that many requests per replica reaches (the ingress
    # turns its BackPressureError into the same JSON 503).
    ongoing = o.max_batch + o.max_queue + 8
    replicas = (o.autoscaling_config or {}).get("max_replicas", o.replicas)
    return {**scale, "ray_actor_options": actor, "max_ongoing_requests": ongoing,
            "max_queued_requests": ongoing * int(replicas)}


def ingress_options(o: ServeOptions) -> dict[str, Any]:
    """The ``AplaIngress`` deployment's Serve options: one replica pinned to the head node, no
    CPU of its own, and room for every request the ``AplaServer`` replicas and their queue
    hold (beyond that Serve's proxy queues)."""
    server = deployment_options(o)
    return {"num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
            "max_ongoing_requests": server["max_ongoing_requests"] + server["max_queued_requests"]}


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``ServeOptions(**args)`` (also ``serve run``'s import path:
    ``apla_rt.serve:build_app``): the ingress bound to the model deployment."""
    o = ServeOptions(**args).check()
    server = AplaServer.options(**deployment_options(o)).bind(asdict(o))  # type: ignore[attr-defined]
    return AplaIngress.options(**ingress_options(o)).bind(asdict(o), server)  # type: ignore[attr-defined]


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
                              "deployments": [{"name": "AplaServer", **deployment_options(o)},
                                              {"name": "AplaIngress", **ingress_options(o)}]}]}


def run_server(options: ServeOptions, host: str, port: int, log: Callable[[str], None],
               ready: Callable[[], None] | None = None, address: str | None = None,
               proxy_location: str = "EveryNode") -> None:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``; see ``apla_rt.service.raycluster``) or
    start a local Ray instance, run the app on ``host:port`` and block until SIGINT or SIGTERM.
    Then delete the app (a cluster joined keeps running) or, on a local instance, stop Serve and
    Ray and end whatever process of theirs is left: within ``raycluster.STOP_SECONDS`` in all,
    also when the signal reached Ray's processes too (a whole process group stopped at once)."""
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
        ray_processes = raycluster.descendants()  # at the stop: did a signal reach them too?
        while not stop.wait(0.5):
            pass
        log("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if connection is not None:
            _stop(connection, log, ray_processes)


def _stop(connection: Any, log: Callable[[str], None], ray_processes: list[Any]) -> None:
    """Delete the app and leave the cluster (joined), or shut Serve down with the local instance
    (``raycluster.stop_local``), each step bounded: within ``raycluster.STOP_SECONDS`` in all."""
    from . import raycluster

    deadline = time.monotonic() + raycluster.STOP_SECONDS
    if connection.started:
        raycluster.stop_local(connection, ray_processes, serve.shutdown, deadline, log)
        return
    if not raycluster.bounded(lambda: serve.delete(APP_NAME), deadline - 2.0):
        log(f"could not delete the application {APP_NAME!r} in time; `serve status` on the "
            "cluster shows it, `serve delete` removes it")
    if not raycluster.bounded(lambda: raycluster.disconnect(connection), deadline):
        raycluster.exit_now(log)
