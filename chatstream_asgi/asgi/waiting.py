"""Waiting over HTTP: who waits, how long it will wait for a slot, and what it sees meanwhile.

Under fair admission, turns go round the clients: a client is its API key when the middleware
checked one, else its address (the last `X-Forwarded-For` entry, the one the proxy in front
saw, only with `trust_forwarded=True`, since a client can write any header itself). A proxy may
append its own `X-Forwarded-For` line rather than extend the client's (HAProxy does): the lines
read as one list in their order (RFC 9110 §5.3), so the client's forged line comes first and the
proxy's last.

`X-ChatStream-Deadline: <seconds>` is the client's own limit on its wait in the queue; with
`ChatStream(max_queue_wait=...)` the smaller of the two wins. A request still waiting at its
deadline is refused with 503 `queue_timeout` and a `Retry-After` estimate (DESIGN §5).

A streaming request that must wait gets a `WaitingResponse`: its 200 goes out when it enters
the queue, then queue frames tell the client its position and ETA until the slot comes, and
the reply follows on the same stream. Non-streaming formats keep their status undecided until
the slot is granted, so they never see this response.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from chatstream_asgi.asgi.exchange import ChatExchange
from chatstream_asgi.asgi.streaming import AdmittedResponse, init_streaming_head, report_outcome
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.errors import ChatStreamError, InvalidRequest, ShuttingDown, quoted
from chatstream_asgi.outcomes import CLIENT_DISCONNECTED_BEFORE_STREAMING, UNKNOWN_ERROR_OCCURRED, OutcomeCallback
from chatstream_asgi.runtime.admission import PositionReport, Slot, Ticket

DEADLINE_HEADER = "X-ChatStream-Deadline"
#: Where the middleware leaves the API key a request was admitted with.
API_KEY_SCOPE_KEY = "chatstream_asgi.api_key"


def client_identity(scope: Scope, trust_forwarded: bool) -> tuple[str, str]:
    """Who a request is for fair turns: `("key", ...)` or `("address", ...)`."""
    api_key = scope.get(API_KEY_SCOPE_KEY)
    if isinstance(api_key, str):
        return ("key", api_key)
    if trust_forwarded:
        forwarded = ",".join(Headers(scope=scope).getlist("x-forwarded-for")).rsplit(",", 1)[-1].strip()
        if forwarded:
            return ("address", forwarded)
    client = scope.get("client")
    return ("address", client[0] if client else "")


def queue_deadline(scope: Scope, max_queue_wait: float | None) -> float | None:
    """Seconds this request may wait for a slot (None: no limit); a bad header is 400 naming it."""
    raw = Headers(scope=scope).get(DEADLINE_HEADER)
    if raw is None:
        return max_queue_wait
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(f"{DEADLINE_HEADER} must be a number of seconds (0 or more), not {quoted(raw)}")
    return seconds if max_queue_wait is None else min(seconds, max_queue_wait)


class WaitingResponse(Response):
    """The stream of a request that waits for a slot: 200 at once, queue frames, then the reply.

    `queue_frame(position, eta_s)` encodes what the client is told whenever its position
    changes and at least every ping interval (the frames keep proxies from timing out, as pings
    do); `error_frame` encodes a refusal that comes after the 200 (the deadline). `start(slot)`
    builds the admitted response once the slot is granted; it streams on after these headers, so
    it must count its head as sent (`started`): a failure of its generation (an upstream that
    refuses, say) then ends the stream in-band too, rather than as a refusal's JSON body after
    the queue frames.
    `release()` undoes what the request held while it waited (the session's turn lock) when no
    reply follows. A waiter that leaves gets its one outcome callback, as when it waits silently.
    """

    def __init__(
        self,
        *,
        request: Request,
        exchange: ChatExchange,
        ticket: Ticket,
        callback: OutcomeCallback | None,
        media_type: str,
        headers: dict[str, str],
        queue_frame: Callable[[int, float | None], bytes],
        error_frame: Callable[[ChatStreamError], bytes],
        start: Callable[[Slot], AdmittedResponse],
        release: Callable[[], Awaitable[None]],
    ) -> None:
        init_streaming_head(self, media_type, headers)
        self._request = request
        self._exchange = exchange
        self._ticket = ticket
        self._callback = callback
        self._queue_frame = queue_frame
        self._error_frame = error_frame
        self._start = start
        self._release = release
        exchange.open_turn = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

            async def report(position: int, eta_s: float | None) -> None:
                frame = self._queue_frame(position, eta_s)
                await send({"type": "http.response.body", "body": frame, "more_body": True})

            started = time.monotonic()
            slot = await self._wait(receive, report)
        except ChatStreamError as error:  # too late for a status: the refusal is the stream's end
            telemetry_of(self._request.scope).refused(error)
            self._exchange.open_turn = None
            await self._release()
            await send({"type": "http.response.body", "body": self._error_frame(error), "more_body": False})
            return
        except anyio.get_cancelled_exc_class():
            # The server is stopping: the waiter hears why in-band and gets its one outcome.
            with anyio.CancelScope(shield=True):
                if not self._exchange.client_left.is_set():
                    frame = self._error_frame(ShuttingDown("the server is shutting down"))
                    await send({"type": "http.response.body", "body": frame, "more_body": False})
                await self.abandon()
            raise
        except BaseException:
            self._exchange.open_turn = None
            with anyio.CancelScope(shield=True):
                await self._release()
            raise
        if slot is None:
            await self.abandon()
            return
        telemetry_of(self._request.scope).admitted(time.monotonic() - started)
        await self._start(slot)(scope, receive, _after_start(send))

    async def _wait(self, receive: Receive, report: PositionReport) -> Slot | None:
        """The ticket's wait; without a middleware in front, this response watches the client
        meanwhile (and the turn, once it runs, watches on its own)."""
        exchange = self._exchange
        if not exchange.watched_by_response:
            return await self._ticket.wait(exchange.client_left, report, exchange.ping_interval)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(exchange.watch, receive)
            try:
                slot = await self._ticket.wait(exchange.client_left, report, exchange.ping_interval)
            finally:
                task_group.cancel_scope.cancel()
        return slot

    async def abandon(self) -> None:
        """End a wait that will never stream: leave the queue, release, report the outcome once."""
        if self._exchange.open_turn is not self:
            return
        self._exchange.open_turn = None
        self._ticket.leave()
        await self._release()
        left = self._exchange.client_left.is_set()
        await report_outcome(
            self._callback, self._request, CLIENT_DISCONNECTED_BEFORE_STREAMING if left else UNKNOWN_ERROR_OCCURRED
        )


def _after_start(send: Send) -> Send:
    """`send` for a response whose headers the waiting response already sent."""

    async def send_body(message: Message) -> None:
        if message["type"] != "http.response.start":
            await send(message)

    return send_body
