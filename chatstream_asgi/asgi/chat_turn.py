"""`ChatTurnResponse`: the streamed reply of one `/chat_stream` turn, recorded in its session.

The conversation follows `core.history`'s rules (the same as the console's); this module adds
what HTTP needs: the wire format, the head at the right moment, pings while the model is
silent, and saving the session before the slot is freed.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.types import Send

from chatstream_asgi.asgi.exchange import ChatExchange
from chatstream_asgi.asgi.http_errors import error_body
from chatstream_asgi.asgi.streaming import (
    MESSAGE_ID_HEADER,
    STREAM_HEADERS,
    AdmittedResponse,
    defers_head,
    relay,
)
from chatstream_asgi.asgi.wire import WireEncoder
from chatstream_asgi.core.history import TurnHistory
from chatstream_asgi.core.params import ChatTurnRequest, GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.core.reply import ReplyShaper
from chatstream_asgi.errors import (
    ChatStreamError,
    SessionStoreUnavailable,
    SessionValueNotStorable,
    ShuttingDown,
)
from chatstream_asgi.log import request_logger
from chatstream_asgi.outcomes import (
    CLIENT_DISCONNECTED_BEFORE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR_OCCURRED,
    OutcomeCallback,
)
from chatstream_asgi.runtime.admission import Slot
from chatstream_asgi.runtime.service import ChatService
from chatstream_asgi.sessions.store import CHAT_PROMPT_KEY

logger = request_logger(__name__)


class ChatTurnResponse(AdmittedResponse):
    """The streamed reply of one `/chat_stream` turn, recorded in the session's conversation."""

    def __init__(
        self,
        *,
        request: Request,
        exchange: ChatExchange,
        slot: Slot,
        service: ChatService,
        prompt: AbstractChatPrompt,
        turn: ChatTurnRequest,
        params: GenerationParams,
        encoder: WireEncoder,
        callback: OutcomeCallback | None,
        message_id: str | None = None,
    ) -> None:
        self.message_id = message_id or str(uuid.uuid4())
        super().__init__(
            request=request,
            exchange=exchange,
            slot=slot,
            callback=callback,
            media_type=encoder.media_type,
            headers={MESSAGE_ID_HEADER: self.message_id, **STREAM_HEADERS},
        )
        self._service = service
        self._params = params
        self._encoder = encoder
        self._history = TurnHistory(
            prompt,
            user_input=turn.user_input,
            regenerate=turn.regenerate,
            edit=turn.edit,
            system=turn.system,
            message_id=self.message_id,
        )
        self.telemetry.content("prompt", turn.user_input)

    async def run(self, send: Send) -> str:
        history = self._history
        shaper = ReplyShaper.for_prompt(history.prompt)  # None: shown as generated

        async def send_text(text: str) -> None:
            text = history.add(text)  # recorded as it streams
            if shaper is not None and not (text := shaper.feed(text)):
                return
            await self.start(send)
            await send({"type": "http.response.body", "body": self._encoder.delta(text), "more_body": True})
            self.delivered = True

        async def send_ping() -> None:
            if ping := self._encoder.ping():
                await self.start(send)
                await send({"type": "http.response.body", "body": ping, "more_body": True})

        conversation = self._exchange.session.session_id
        async with self._service.generate(self._slot, history.model_input(), self._params, conversation) as gen:
            self.stats = gen.stats
            if not defers_head(gen):
                await self.start(send)
            failure = await relay(gen, self._exchange, send_text, send_ping, telemetry=self.telemetry)
        self.telemetry.content("reply", history.reply)
        outcome = self.outcome_after(failure)
        if not self.started and outcome != SUCCESS:
            await self.refuse_unstarted(send, outcome, failure)
            return outcome
        await self.start(send)
        if outcome == SUCCESS and history.echo_pending:  # the model added nothing to it
            await send_text("")
        if outcome == SUCCESS and shaper is not None and (tail := shaper.flush()):
            await send({"type": "http.response.body", "body": self._encoder.delta(tail), "more_body": True})
            self.delivered = True
        await self.record_once(outcome)  # the session is saved before the client sees the end
        if outcome == SUCCESS:
            usage = {"prompt_tokens": gen.stats.prompt_tokens, "completion_tokens": gen.stats.completion_tokens}
            await send({"type": "http.response.body", "body": self._encoder.done(SUCCESS, usage), "more_body": False})
        elif failure is not None and outcome == UNKNOWN_ERROR_OCCURRED:
            await self._end_cut(send, failure.as_error())
        return outcome

    async def end_cut_short(self, send: Send, error: ShuttingDown) -> None:
        await self._end_cut(send, error)

    async def _end_cut(self, send: Send, error: ChatStreamError) -> None:
        """End a started reply that will not finish, so that no client takes it for a finished
        one: with the format's error frame, or (delta text, which has none) by returning without
        the response's end, so the server closes the connection mid-body and every HTTP client
        raises (httpx: `RemoteProtocolError`; a proxy passes the cut on)."""
        if not self._encoder.cut_closes_connection:
            body = self._encoder.error(error_body(error))
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        logger.warning("reply cut short (%s: %s): closing its connection without the end", error.code, error.detail)

    async def record(self, outcome: str) -> None:
        session = self._exchange.session
        # A failed reply is not history, and neither is one the client never saw a byte of.
        failed = outcome == UNKNOWN_ERROR_OCCURRED
        shown = outcome != CLIENT_DISCONNECTED_BEFORE_STREAMING
        session.get_session()[CHAT_PROMPT_KEY] = self._history.conversation_after(shown=shown, failed=failed)
        session.save_session()
        try:
            await session.persist()
        except (SessionStoreUnavailable, SessionValueNotStorable) as error:
            # The reply was delivered; only its record is lost. Nothing in memory is half-written.
            logger.warning("session %s not saved after its turn: %s", session.session_id, error.detail)
        await session.unlock_turn()
