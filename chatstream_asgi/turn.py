"""One admitted chat turn: stream the reply, watch the client, and end with exactly one outcome.

`ChatTurnResponse` is what `handle_chat_stream_request` returns once a slot is held. It is a
Starlette `Response`, so a FastAPI endpoint can return it as is, but it streams on its own
terms: one task sends while a second waits for the client to leave, and the engine is told
to stop the moment it does. Whatever happens (success, disconnect, a model error, server
shutdown) `finish` runs once, shielded: history, session, slot, then the callback.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream_asgi.admission import Slot
from chatstream_asgi.engine.base import Engine, Generation, GenerationFailed
from chatstream_asgi.errors import SessionStoreUnavailable
from chatstream_asgi.exchange import ChatExchange
from chatstream_asgi.params import GenerationParams
from chatstream_asgi.prompt import AbstractChatPrompt
from chatstream_asgi.session import CHAT_PROMPT_KEY
from chatstream_asgi.wire import WireEncoder

logger = logging.getLogger(__name__)

SUCCESS = "success"
CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"

OutcomeCallback = Callable[[Request, str], "Awaitable[None] | None"]
MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"


async def report_outcome(callback: OutcomeCallback | None, request: Request, outcome: str) -> None:
    """Call a user's callback (plain or async); its exception is logged, never propagated."""
    if callback is None:
        return
    try:
        result = callback(request, outcome)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a user's callback must not break the server or the next request
        logger.exception("outcome callback %r raised", callback)


class ChatTurnResponse(Response):
    """The streamed reply of one admitted turn (see the module docstring)."""

    def __init__(
        self,
        *,
        request: Request,
        exchange: ChatExchange,
        slot: Slot,
        engine: Engine,
        prompt: AbstractChatPrompt,
        user_input: str,
        regenerate: bool,
        params: GenerationParams,
        context_len: int,
        encoder: WireEncoder,
        callback: OutcomeCallback | None,
    ) -> None:
        self.message_id = str(uuid.uuid4())
        # As StreamingResponse does: no body attribute, so no Content-Length is declared.
        self.status_code = 200
        self.media_type = encoder.media_type
        self.background = None
        self.init_headers({MESSAGE_ID_HEADER: self.message_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._request = request
        self._exchange = exchange
        self._slot = slot
        self._engine = engine
        self._params = params
        self._context_len = context_len
        self._encoder = encoder
        self._callback = callback
        self._generation: Generation | None = None
        self._finished = False
        self._sent_text = False
        # The conversation as it was, for a turn that fails or never shows the client anything.
        self._prompt_before = prompt.clone()
        self._prompt = prompt
        if regenerate:
            prompt.clear_last_responder_message()
        else:
            prompt.add_requester_msg(user_input)
            prompt.add_responder_msg(None)
        prompt.set_responder_last_msg_id(self.message_id)
        exchange.open_turn = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = UNKNOWN_ERROR_OCCURRED
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            outcome = await self._stream(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(outcome)

    async def abandon(self) -> None:
        """End a turn whose response was never sent (the endpoint did not return it)."""
        left = self._exchange.client_left.is_set()
        await self._finish(CLIENT_DISCONNECTED_BEFORE_STREAMING if left else UNKNOWN_ERROR_OCCURRED)

    async def _stream(self, send: Send) -> str:
        exchange = self._exchange
        generation = self._engine.start_generation(self._prompt.clone(), self._params, context_len=self._context_len)
        self._generation = generation
        reply = ""
        failure: GenerationFailed | None = None
        async with anyio.create_task_group() as task_group:

            async def cancel_when_client_leaves() -> None:
                await exchange.client_left.wait()
                generation.cancel()

            task_group.start_soon(cancel_when_client_leaves)
            try:
                # After a cancel, keep reading until the engine confirms it stopped: the slot
                # is only free once the model is.
                while (text := await generation.next_text(exchange.ping_interval)) is not None:
                    if exchange.client_left.is_set():
                        continue
                    if not text:
                        if ping := self._encoder.ping():
                            await send({"type": "http.response.body", "body": ping, "more_body": True})
                        continue
                    reply += text
                    self._prompt.set_responder_last_msg(reply)
                    await send({"type": "http.response.body", "body": self._encoder.delta(text), "more_body": True})
                    self._sent_text = True
            except GenerationFailed as error:
                failure = error
            finally:
                task_group.cancel_scope.cancel()
        if exchange.client_left.is_set():
            return CLIENT_DISCONNECTED_WHILE_STREAMING if self._sent_text else CLIENT_DISCONNECTED_BEFORE_STREAMING
        if failure is not None:
            body = {"error": "generation_failed", "detail": str(failure)}
            await send({"type": "http.response.body", "body": self._encoder.error(body), "more_body": False})
            return UNKNOWN_ERROR_OCCURRED
        stats = generation.stats
        usage = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
        await send({"type": "http.response.body", "body": self._encoder.done(SUCCESS, usage), "more_body": False})
        return SUCCESS

    async def _finish(self, outcome: str) -> None:
        """History, session, slot, callback: once, in that order (DESIGN §1 step 8)."""
        if self._finished:
            return
        self._finished = True
        self._exchange.open_turn = None
        generation = self._generation
        if generation is not None and generation.stats.finish_reason is None:
            # Left mid-stream by an exception or a shutdown: stop the model before the slot goes.
            generation.cancel()
            try:
                while await generation.next_text(timeout=60.0) is not None:
                    pass
            except GenerationFailed:
                pass  # the outcome is already decided; the engine logged the failure
        session = self._exchange.session
        if outcome in (UNKNOWN_ERROR_OCCURRED, CLIENT_DISCONNECTED_BEFORE_STREAMING):
            # A failed reply is not history, and neither is one the client never saw a byte of.
            session.get_session()[CHAT_PROMPT_KEY] = self._prompt_before
        session.save_session()
        try:
            await session.persist()
        except SessionStoreUnavailable as error:
            # The reply was delivered; only its record is lost. Nothing in memory is half-written.
            logger.warning("session %s not saved after its turn: %s", session.session_id, error.detail)
        self._slot.release()
        await session.unlock_turn()
        if generation is not None:
            self._request.state.chat_generation = generation.stats
        await report_outcome(self._callback, self._request, outcome)
