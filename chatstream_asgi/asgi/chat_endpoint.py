"""`ChatEndpoint`: one `POST /chat_stream`, from the request to the response that streams it.

It validates the request, admits it (or says 429), and returns the streaming response.
Everything that can be refused is refused before a slot is taken, so a refusal never holds
one. Behind `ChatStreamMiddleware` the body, the session and the client's disconnect come in the
exchange the middleware put in the scope; without it (a ChatStream app's own endpoint behind
fastsession), `standalone` does those jobs first. The ChatStream facade and the CLI each build
one over a `ChatService`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Protocol

import anyio
from starlette.requests import Request
from starlette.responses import Response

from chatstream_asgi.asgi.chat_turn import ChatTurnResponse
from chatstream_asgi.asgi.client_rules import ClientRules, RoleGrant, refusal
from chatstream_asgi.asgi.exchange import EXCHANGE_KEY, ChatExchange
from chatstream_asgi.asgi.http_errors import client_closed_response, error_body, error_response
from chatstream_asgi.asgi.standalone import handle_without_middleware
from chatstream_asgi.asgi.streaming import MESSAGE_ID_HEADER, STREAM_HEADERS, report_outcome, wait_for_slot
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.asgi.waiting import WaitingResponse, client_identity, queue_deadline
from chatstream_asgi.asgi.wire import (
    STREAM_FORMATS,
    StreamFormat,
    WireEncoder,
    check_stream_format,
    choose_format,
    encoder_for,
)
from chatstream_asgi.core.params import ChatTurnRequest, GenerationParams, cache_scope, parse_chat_request
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.errors import ChatStreamError, InvalidRequest, NothingToRegenerate, SessionBusy
from chatstream_asgi.outcomes import CLIENT_DISCONNECTED_BEFORE_STREAMING, OutcomeCallback
from chatstream_asgi.runtime.admission import Slot, Ticket
from chatstream_asgi.runtime.service import ChatService
from chatstream_asgi.sessions.attached import FallbackSessions
from chatstream_asgi.sessions.store import CHAT_PROMPT_KEY, GENERATION_PARAMS_KEY, TurnSession


@dataclass(frozen=True)
class _Admitted:
    """A turn past admission: what it generates from, and its slot, or the ticket it waits with."""

    prompt: AbstractChatPrompt
    params: GenerationParams
    ticket: Ticket | None  # set for a client that is shown its wait (SSE): it waits in its response
    slot: Slot | None  # None without a ticket: the client left while it waited


class ChatServer(Protocol):
    """What `ChatStreamMiddleware(chat_stream=...)` takes: the `ChatStream` facade, or a
    `ChatEndpoint` itself. The middleware answers a chat and closes at shutdown through these two
    methods, so a `ChatStream` subclass that overrides them is heard; everything else goes
    through `endpoint`."""

    @property
    def endpoint(self) -> ChatEndpoint:
        """The endpoint that answers `/chat_stream` (and whose service the other routes use)."""
        ...

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | str | None = None, callback: OutcomeCallback | None = None
    ) -> Response:
        """Answer one `POST /chat_stream`."""
        ...

    def close(self) -> None:
        """Stop the engines' threads (blocking: call it off the event loop)."""
        ...


class ChatEndpoint:
    """Answers `POST /chat_stream` for one `ChatService` (see the module docstring).

    `stream_format` is the format of a request that asks for none; `too_many_request_as_http_error=False`
    answers a full queue with ChatStream's 200 + error JSON; `rules` (ChatStream's `client_roles`)
    decide which client may chat and which messages are pass phrases. `allow_system_prompt` lets
    a chat carry `system` text for its conversation; off (the default), such a chat is refused,
    so no client can replace the system text an app's prompt class sets (a persona, a guardrail).
    """

    def __init__(
        self,
        service: ChatService,
        *,
        stream_format: StreamFormat = "delta",
        too_many_request_as_http_error: bool = True,
        rules: ClientRules | None = None,
        allow_system_prompt: bool = False,
    ) -> None:
        check_stream_format(stream_format)
        self.service = service
        self.stream_format: StreamFormat = stream_format
        self.too_many_request_as_http_error = too_many_request_as_http_error
        self.rules = rules
        self.allow_system_prompt = allow_system_prompt
        #: Sessions for requests that reach the handler with none attached (no middleware in front).
        self.fallback_sessions = FallbackSessions()

    @property
    def endpoint(self) -> ChatEndpoint:
        """Itself, so that an endpoint is a `ChatServer` the middleware can take."""
        return self

    async def handle(
        self, request: Request, request_body: bytes | str | None = None, callback: OutcomeCallback | None = None
    ) -> Response:
        """Answer one `POST /chat_stream`: an error, or the streamed reply once a slot is free.

        `request_body` is optional behind `ChatStreamMiddleware`, which replays the body.
        `callback(request, outcome)` is called exactly once if the request reached admission.
        """
        exchange = request.scope.get(EXCHANGE_KEY)
        if not isinstance(exchange, ChatExchange):
            return await handle_without_middleware(
                request,
                request_body,
                callback,
                sessions=self.fallback_sessions,
                prompt_from_dict=self.service.prompt_from_dict,
                handle=self.handle,
            )
        session = exchange.session
        denied = refusal(self.rules, request, session.get_session(), "chat_stream")
        if denied is not None:
            return denied
        try:
            stream_format = choose_format(request.scope, self.stream_format)
            if stream_format is None:
                raise InvalidRequest(f"'format' must be one of {', '.join(STREAM_FORMATS)}")
            turn = parse_chat_request(exchange.body if request_body is None else request_body)
            if turn.system is not None and not self.allow_system_prompt:
                raise InvalidRequest("this server does not take a chat's 'system' text (allow_system_prompt is off)")
            # A pass phrase counts as a new message only, never as the text of an edit or a regenerate.
            plain_turn = not turn.regenerate
            granted = (
                self.rules.promote(session.get_session(), turn.user_input)
                if self.rules is not None and plain_turn
                else None
            )
            if granted is not None:  # a pass phrase: answered here, never shown to the model
                return await _answer_grant(session, granted, stream_format)
            admitted = await self._admit(request, exchange, turn, stream_format == "sse", callback)
        except ChatStreamError as error:
            telemetry_of(request.scope).refused(error)
            return error_response(error, status_code=self.refusal_status(error))
        return await self._respond(request, exchange, turn, admitted, encoder_for(stream_format), callback)

    async def _admit(
        self,
        request: Request,
        exchange: ChatExchange,
        turn: ChatTurnRequest,
        streams_its_wait: bool,
        callback: OutcomeCallback | None,
    ) -> _Admitted:
        """Refuse what can be refused before anything is held, then take the session's turn lock
        and a place in admission: a slot, or (a client that is shown its wait) a ticket."""
        service, session = self.service, exchange.session
        max_wait = queue_deadline(request.scope, service.max_queue_wait)
        limit = service.params.max_new_tokens
        service.params.with_overrides(turn.overrides, max_new_tokens_limit=limit)  # refuse bad input before locking
        client = client_identity(request.scope, service.trust_forwarded)
        service.admission.check_room(client)  # and overload: a 429 costs no round trip to a shared store
        if not await session.lock_turn():
            raise SessionBusy(
                "a turn of this conversation is still running: wait for it or stop it first (if the "
                "server running it stopped, the conversation is freed within seconds: retry after Retry-After)"
            )
        try:
            if not session.is_new:  # another replica may have finished a turn since the session was read
                await session.reload()
            stored = dict(session.get_session().get(GENERATION_PARAMS_KEY, {}))
            if "max_new_tokens" in stored:  # the server's limit may have dropped since it was set
                stored["max_new_tokens"] = min(stored["max_new_tokens"], limit)
            params = service.params.with_overrides({**stored, **turn.overrides}, max_new_tokens_limit=limit)
            # The conversation cache lends this turn only what its own session (and salt) left there.
            params = replace(params, cache_scope=cache_scope(("session", session.session_id), turn.cache_salt))
            prompt = self._session_prompt(session)
            if turn.regenerate and not prompt.has_reply_to_regenerate():
                raise NothingToRegenerate("there is no reply to regenerate in this conversation yet")
            conversation = None if session.is_new else session.session_id
            ticket = service.enter(client, max_wait, conversation)
            # A waiting SSE client gets its 200 now and queue frames; other formats wait silently.
            if ticket.slot is None and streams_its_wait:
                return _Admitted(prompt, params, ticket, None)
            return _Admitted(prompt, params, None, await wait_for_slot(ticket, request, exchange, callback))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await session.unlock_turn()
            raise

    async def _respond(
        self,
        request: Request,
        exchange: ChatExchange,
        turn: ChatTurnRequest,
        admitted: _Admitted,
        encoder: WireEncoder,
        callback: OutcomeCallback | None,
    ) -> Response:
        """The response of an admitted turn: streaming now, streaming its wait first, or 499."""
        session = exchange.session
        message_id = str(uuid.uuid4())

        def start_turn(slot: Slot) -> ChatTurnResponse:
            return ChatTurnResponse(
                request=request,
                exchange=exchange,
                slot=slot,
                service=self.service,
                prompt=admitted.prompt,
                turn=turn,
                params=admitted.params,
                encoder=encoder,
                callback=callback,
                message_id=message_id,
            )

        def resume_turn(slot: Slot) -> ChatTurnResponse:
            # The waiting response already sent the head (and queue frames): a failure of this
            # turn must end the stream in-band (`event: error`), not as a refusal's JSON.
            response = start_turn(slot)
            response.started = True
            return response

        if admitted.ticket is not None:
            return WaitingResponse(
                request=request,
                exchange=exchange,
                ticket=admitted.ticket,
                callback=callback,
                media_type=encoder.media_type,
                headers={MESSAGE_ID_HEADER: message_id, **STREAM_HEADERS},
                queue_frame=encoder.queue,
                error_frame=lambda error: encoder.error(error_body(error)),
                start=resume_turn,
                release=session.unlock_turn,
            )
        if admitted.slot is None:  # the client left while it waited
            await session.unlock_turn()
            await report_outcome(callback, request, CLIENT_DISCONNECTED_BEFORE_STREAMING)
            return client_closed_response()
        return start_turn(admitted.slot)

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | str | None = None, callback: OutcomeCallback | None = None
    ) -> Response:
        """`handle`, under the name ChatStream gives it."""
        return await self.handle(request, request_body, callback)

    def close(self) -> None:
        """Stop the service's engine threads (blocking: call it off the event loop)."""
        self.service.close()

    def refusal_status(self, error: ChatStreamError) -> int:
        """The HTTP status of a refusal: its own, except ChatStream's 200 for a full queue when
        `too_many_request_as_http_error=False`."""
        if error.status_code == 429 and not self.too_many_request_as_http_error:
            return 200
        return error.status_code

    def _session_prompt(self, session: TurnSession) -> AbstractChatPrompt:
        data = session.get_session()
        prompt = data.get(CHAT_PROMPT_KEY)
        if not isinstance(prompt, AbstractChatPrompt):
            prompt = data[CHAT_PROMPT_KEY] = self.service.create_chat_prompt()
        return prompt


async def _answer_grant(session: TurnSession, granted: RoleGrant, stream_format: StreamFormat) -> Response:
    """Store a promoted session and say so in the chat's own format, as ChatStream answers a pass phrase."""
    session.save_session()
    await session.persist()
    encoder = encoder_for(stream_format)
    body = encoder.delta(granted.message) + encoder.done("success", {"prompt_tokens": 0, "completion_tokens": 0})
    return Response(body, media_type=encoder.media_type, headers=granted.headers)
