"""One admitted generation: relay its text to the client, watch the client, end with one outcome.

`AdmittedResponse` is what a handler returns once a slot is held: a Starlette `Response`, so a
FastAPI endpoint can return it as is, that streams on its own terms. One task relays the
engine's text while a second waits for the client to leave and then tells the engine to stop.
Whatever happens (success, disconnect, a model error, server shutdown) `finish` runs once,
shielded: the subclass records what it must (history, session), the slot is freed, and the
callback hears the outcome. `chat_turn.ChatTurnResponse` is the `/chat_stream` turn of a
session; `openai_api` builds the stateless `/v1` one on the same base.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream_asgi.asgi.exchange import ChatExchange
from chatstream_asgi.asgi.http_errors import send_client_closed, send_error
from chatstream_asgi.asgi.telemetry import RequestTelemetry, telemetry_of
from chatstream_asgi.engine.base import Generation, GenerationFailed, GenerationStats
from chatstream_asgi.errors import GenerationError, ShuttingDown
from chatstream_asgi.log import request_logger
from chatstream_asgi.outcomes import (
    CLIENT_DISCONNECTED_BEFORE_STREAMING,
    CLIENT_DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR_OCCURRED,
    OutcomeCallback,
)
from chatstream_asgi.runtime.admission import Slot, Ticket

logger = request_logger(__name__)

MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def report_outcome(callback: OutcomeCallback | None, request: Request, outcome: str) -> None:
    """Count the outcome, then call a user's callback (plain or async); its exception is logged,
    never propagated. Every outcome of every route passes here."""
    telemetry_of(request.scope).finished(outcome, getattr(request.state, "chat_generation", None))
    if callback is None:
        return
    try:
        result = callback(request, outcome)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a user's callback must not break the server or the next request
        logger.exception("outcome callback %r raised", callback)


def defers_head(generation: Generation) -> bool:
    """Whether the response head should wait for the generation's first output (see `started`)."""
    return bool(getattr(generation, "defers_head", False))


def cut_short_outcome(exchange: ChatExchange, delivered: bool) -> str:
    """The outcome of a request the server cancelled: its client's leaving if it had left, else an error."""
    if exchange.client_left.is_set():
        return CLIENT_DISCONNECTED_WHILE_STREAMING if delivered else CLIENT_DISCONNECTED_BEFORE_STREAMING
    return UNKNOWN_ERROR_OCCURRED


async def wait_for_slot(
    ticket: Ticket, request: Request, exchange: ChatExchange, callback: OutcomeCallback | None
) -> Slot | None:
    """`ticket.wait` for a request that waits silently, its wait timed for the queue-wait
    histogram. A request cancelled while it waits (the server stopping) has reached admission:
    it still gets its one outcome."""
    started = time.monotonic()
    try:
        slot = await ticket.wait(exchange.client_left)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await report_outcome(callback, request, cut_short_outcome(exchange, delivered=False))
        raise
    if slot is not None:
        telemetry_of(request.scope).admitted(time.monotonic() - started)
    return slot


async def relay(
    generation: Generation,
    exchange: ChatExchange,
    on_text: Callable[[str], Awaitable[None]],
    on_silence: Callable[[], Awaitable[None]] | None = None,
    *,
    telemetry: RequestTelemetry | None = None,
) -> GenerationFailed | None:
    """Hand each piece of text to `on_text` until the generation ends; cancel it if the client
    leaves. Returns the failure, if the engine reported one."""
    async with anyio.create_task_group() as task_group:

        async def cancel_when_client_leaves() -> None:
            await exchange.client_left.wait()
            generation.cancel()

        task_group.start_soon(cancel_when_client_leaves)
        try:
            # After a cancel, keep reading until the engine confirms it stopped.
            while (text := await generation.next_text(exchange.ping_interval)) is not None:
                if exchange.client_left.is_set():
                    continue
                if text:
                    if telemetry is not None:
                        telemetry.first_text()
                    await on_text(text)
                elif on_silence is not None:
                    await on_silence()
        except GenerationFailed as failure:
            return failure
        finally:
            task_group.cancel_scope.cancel()
    return None


def init_streaming_head(response: Response, media_type: str, headers: dict[str, str]) -> None:
    """Set up a 200 whose body streams later: as StreamingResponse does, no body attribute, so
    no Content-Length is declared."""
    response.status_code = 200
    response.media_type = media_type
    response.background = None
    response.init_headers(headers)


class AdmittedResponse(Response):
    """The response of a request that holds a slot (see the module docstring)."""

    def __init__(
        self,
        *,
        request: Request,
        exchange: ChatExchange,
        slot: Slot,
        callback: OutcomeCallback | None,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        init_streaming_head(self, media_type, headers)
        self._request = request
        self._exchange = exchange
        self._slot = slot
        self._callback = callback
        self._finished = False
        self._recorded = False
        self.telemetry = telemetry_of(request.scope)
        #: Whether any reply text reached the client: it decides between the two disconnect outcomes.
        self.delivered = False
        #: Whether the head went out: at once for a local model (DESIGN §4: once a slot is held);
        #: for a generation that `defers_head` (a remote one), at its first text, ping or end, so
        #: that an upstream that cannot be reached still gets its real status (502/504).
        self.started = False
        self.stats: GenerationStats | None = None
        exchange.open_turn = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = UNKNOWN_ERROR_OCCURRED
        try:
            if self._exchange.watched_by_response:
                outcome = await self._run_watching(receive, send)
            else:
                outcome = await self.run(send)
        except anyio.get_cancelled_exc_class():
            # The server cancelled the request (it is stopping): close a stream its client still
            # reads, so the client sees an end rather than a cut connection.
            outcome = cut_short_outcome(self._exchange, self.delivered)
            exchange = self._exchange
            if exchange.response_started and not exchange.response_complete and not exchange.client_left.is_set():
                with anyio.CancelScope(shield=True):
                    await self.end_cut_short(send, ShuttingDown("the server is shutting down"))
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(outcome)

    async def _run_watching(self, receive: Receive, send: Send) -> str:
        """`run`, watching the client itself (no middleware in front does), as StreamingResponse does."""
        exchange = self._exchange
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(exchange.watch, receive)
            try:
                outcome = await self.run(exchange.track(send))
            finally:
                task_group.cancel_scope.cancel()
        return outcome

    async def run(self, send: Send) -> str:
        """Send the whole response; return the outcome."""
        raise NotImplementedError

    async def start(self, send: Send) -> None:
        """Send the head, once."""
        if not self.started:
            self.started = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

    async def refuse_unstarted(self, send: Send, outcome: str, failure: GenerationFailed | None) -> None:
        """End a response whose head never went out: the failure with its own status, or (the
        client left) nothing anyone reads."""
        if failure is not None and outcome == UNKNOWN_ERROR_OCCURRED:
            await self.send_failure(send, failure.as_error())
        else:
            await send_client_closed(send)

    async def send_failure(self, send: Send, error: GenerationError) -> None:
        """Answer `error` as this route's error JSON (before the head went out)."""
        await send_error(send, error)

    async def end_cut_short(self, send: Send, error: ShuttingDown) -> None:
        """End a started response that the server cut short (SSE formats say why)."""
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def record(self, outcome: str) -> None:
        """Keep what the outcome leaves behind (history); runs before the slot is freed."""

    async def record_once(self, outcome: str) -> None:
        """`record`, once: a response calls it before its final body goes out, so a client that
        sends its next request the moment it reads the end (a keep-alive connection, a page
        reload) finds what this turn left; `finish` calls it for every other way a turn ends."""
        if not self._recorded:
            self._recorded = True
            await self.record(outcome)

    async def abandon(self) -> None:
        """End a turn whose response was never sent (the endpoint did not return it)."""
        left = self._exchange.client_left.is_set()
        await self._finish(CLIENT_DISCONNECTED_BEFORE_STREAMING if left else UNKNOWN_ERROR_OCCURRED)

    def outcome_after(self, failure: GenerationFailed | None) -> str:
        """How a relay ended, as an outcome."""
        if self._exchange.client_left.is_set():
            return CLIENT_DISCONNECTED_WHILE_STREAMING if self.delivered else CLIENT_DISCONNECTED_BEFORE_STREAMING
        return UNKNOWN_ERROR_OCCURRED if failure is not None else SUCCESS

    async def _finish(self, outcome: str) -> None:
        """Record, free the slot, report: once, in that order (DESIGN §1 step 8)."""
        if self._finished:
            return
        self._finished = True
        self._exchange.open_turn = None
        try:
            await self.record_once(outcome)
        finally:
            self._slot.release()
        if self.stats is not None:
            self._request.state.chat_generation = self.stats
        await report_outcome(self._callback, self._request, outcome)
