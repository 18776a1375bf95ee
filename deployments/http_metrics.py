"""Counts every HTTP request the ingress answers, by route, status code, family and model.

The outermost middleware, so that refusals by the guard (401, 413, 503) count too. The route label
is the matched route's template (`/v1/models/{model_id}`), or `unmatched`; the model label is set
by the ingress only once the name is known to be a served model: labels stay a bounded set.
"""

from __future__ import annotations

import asyncio
import contextvars
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import IngressMetrics

# The request's {"family", "model"}, filled in by the ingress when it looks the model up. The dict
# itself is shared with the tasks the request's handler starts, so their writes are seen here.
REQUEST_LABELS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("request_labels",
                                                                                      default=None)


def label_request(family: str, model: str) -> None:
    labels = REQUEST_LABELS.get()
    if labels is not None:
        labels.update(family=family, model=model)


CLIENT_CLOSED = 499  # the status label of a request its client left before any answer (nginx's)

# The method label's values: a client can send any method name, and each would be a series of its own
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

class HTTPMetrics:
    def __init__(self, app: ASGIApp):
        self.app = app
        self.metrics = IngressMetrics()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        labels = {"family": "", "model": ""}
        token = REQUEST_LABELS.set(labels)
        status: int | None = None  # the answer's, once it starts
        client_left = False  # the client's disconnect passed through

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                # an answer to a client already gone (FastAPI's 400 for a multipart body cut off mid-upload)
                # reaches no one: the hang-up is what happened, as when nothing is answered
                status = CLIENT_CLOSED if client_left else message["status"]
            await send(message)

        async def receive_seen() -> Message:
            nonlocal client_left
            message = await receive()
            client_left = client_left or message["type"] == "http.disconnect"
            return message

        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive_seen, send_seen)
        except asyncio.CancelledError:
            # Serve cancels a request whose client hung up: before any answer that is no server error but
            # nginx's 499 (client closed request); it was counted 500, so 5xx alerts fired on client timeouts
            status = status or CLIENT_CLOSED
            raise
        finally:
            # no answer: the client left (the guard drops a request whose client hung up mid-body), else the app failed
            status = status or (CLIENT_CLOSED if client_left else 500)
            REQUEST_LABELS.reset(token)
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.answered(route, method if method in METHODS else "other", status, labels["family"],
                                  labels["model"], time.monotonic() - started)
