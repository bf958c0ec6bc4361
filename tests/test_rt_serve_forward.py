"""Without starting Ray: the ingress's ``forward`` (apla_rt/service/serve.py) against fake replica
calls. A replica lost mid-request (``RayActorError``) is retried once on another, told the
time left; lost again, or with too little time left, the answer is a JSON 503 with
Retry-After; Serve's full queue (``BackPressureError``) is a JSON 503; a replica that never
answers is a JSON 504 once the request's timeout and the grace are over, and its call is
cancelled. Every error body is one line of JSON."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import require

require("ray.serve")

from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from apla_rt.service import serve  # noqa: E402
from apla_rt.service.serve import RETRIED_HEADER, Reply, forward, request_budget  # noqa: E402

OK = Reply(200, b"video", "image/gif", {"X-Apla-Seed": "7"})


class FakeReplicas:
    """``send`` for ``forward``: each call takes the next outcome (a Reply, an exception to
    raise, or "hang") and records the timeout header it was given."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.headers: list[str | None] = []
        self.cancelled = 0

    def __call__(self, header):
        self.headers.append(header)
        outcome = self.outcomes.pop(0)
        fake = self

        class Response:
            def __await__(self):
                return self.run().__await__()

            async def run(self):
                await asyncio.sleep(0.01)
                if outcome == "hang":
                    await asyncio.sleep(3600)
                if isinstance(outcome, BaseException):
                    raise outcome
                return Reply(outcome.status, outcome.body, outcome.media_type, dict(outcome.headers))

            def cancel(self):
                fake.cancelled += 1

        return Response()


def run(send, timeout_s=30.0, header=None, **kw) -> Reply:
    return asyncio.run(forward(send, timeout_s, header, **kw))


def error_of(reply: Reply) -> str:
    assert reply.media_type == "application/json"
    error = json.loads(reply.body)["error"]
    assert isinstance(error, str) and "\n" not in error
    return error


def test_an_answer_passes_through_unchanged():
    send = FakeReplicas(OK)
    reply = run(send, header="12")
    assert (reply.status, reply.body, reply.headers) == (200, b"video", {"X-Apla-Seed": "7"})
    assert send.headers == ["12"]  # the client's header, as it came


@pytest.mark.parametrize("lost", [ActorDiedError(), ActorUnavailableError("node gone", None)],
                         ids=["died", "unavailable"])
def test_a_lost_replica_is_retried_once_with_the_time_left(lost):
    send = FakeReplicas(lost, OK)
    reply = run(send, timeout_s=30.0, header="20")
    assert reply.status == 200 and reply.headers[RETRIED_HEADER] == "1"
    assert send.headers[0] == "20" and 19.0 < float(send.headers[1]) < 20.0  # the time left of 20 s


def test_lost_twice_is_a_json_503():
    send = FakeReplicas(ActorDiedError(), ActorDiedError(), OK)
    reply = run(send)
    assert reply.status == 503 and reply.headers["Retry-After"] == "1"
    assert "was lost" in error_of(reply) and "its retry" in error_of(reply)
    assert len(send.headers) == 2  # one retry, no more


def test_no_retry_without_time_left():
    ticks = iter([0.0, 0.0, 9.5, 9.5, 9.5])  # the lost call took 9.5 s of a 10 s budget
    send = FakeReplicas(ActorDiedError(), OK)
    reply = run(send, timeout_s=10.0, clock=lambda: next(ticks))
    assert reply.status == 503 and "was lost" in error_of(reply) and len(send.headers) == 1


def test_a_full_queue_is_a_json_503_with_retry_after():
    reply = run(FakeReplicas(BackPressureError(num_queued_requests=45, max_queued_requests=45)))
    assert reply.status == 503 and int(reply.headers["Retry-After"]) >= 1
    assert "queue is full" in error_of(reply)


def test_a_replica_that_never_answers_is_a_json_504_and_is_cancelled(monkeypatch):
    monkeypatch.setattr(serve, "ANSWER_GRACE_S", 0.05)
    send = FakeReplicas("hang")
    reply = run(send, timeout_s=0.2)
    assert reply.status == 504 and "timeout of 0.2 s" in error_of(reply)
    assert send.cancelled == 1


def test_the_budget_is_the_smaller_of_the_server_timeout_and_a_readable_header():
    assert request_budget(300.0, None) == 300.0
    assert request_budget(300.0, "2.5") == 2.5
    assert request_budget(10.0, "99") == 10.0
    for unreadable in ("soon", "-1", "0", "nan", "inf"):  # the replica answers these with a 400
        assert request_budget(300.0, unreadable) == 300.0
