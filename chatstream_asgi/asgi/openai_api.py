"""`POST /v1/chat/completions` and `GET /v1/models`: the OpenAI chat-completions API.

The same admission, engines, cancellation and outcome callbacks as `/chat_stream`, but
stateless: the client sends the whole conversation, and there is no session and no cookie.
Replies and chunks have the shapes the official `openai` client parses; errors use OpenAI's
`{"error": {"message", "type", "param", "code"}}` with DESIGN's codes and real statuses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from chatstream_asgi.asgi.chat_endpoint import ChatEndpoint
from chatstream_asgi.asgi.exchange import ChatExchange
from chatstream_asgi.asgi.http_errors import client_closed_response, error_body, error_response, send_error
from chatstream_asgi.asgi.streaming import (
    STREAM_HEADERS,
    AdmittedResponse,
    defers_head,
    relay,
    report_outcome,
    wait_for_slot,
)
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.asgi.waiting import WaitingResponse, client_identity, queue_deadline
from chatstream_asgi.asgi.wire import sse_event, sse_ping
from chatstream_asgi.core.params import GenerationParams, cache_scope, parse_cache_salt, parse_json_object
from chatstream_asgi.core.prompt import ChatPrompt
from chatstream_asgi.engine.base import Generation
from chatstream_asgi.errors import (
    ChatStreamError,
    GenerationError,
    InvalidParameter,
    InvalidRequest,
    NotFound,
    ShuttingDown,
    quoted,
)
from chatstream_asgi.outcomes import (
    CLIENT_DISCONNECTED_BEFORE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR_OCCURRED,
    OutcomeCallback,
)
from chatstream_asgi.runtime.admission import Slot
from chatstream_asgi.runtime.service import ChatService

_CREATED = int(time.time())
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call")
_MAX_STOP = 4
_EVENT_STREAM = "text/event-stream; charset=utf-8"


def models_response(service: ChatService) -> JSONResponse:
    """`GET /v1/models`: the one model this server serves, under its `name`."""
    model = {"id": service.name, "object": "model", "created": _CREATED, "owned_by": "chatstream-asgi"}
    return JSONResponse({"object": "list", "data": [model]})


@dataclass(frozen=True)
class CompletionRequest:
    """A validated `/v1/chat/completions` body."""

    messages: list[dict[str, str]]
    params: GenerationParams
    stream: bool
    include_usage: bool
    include_queue_status: bool
    cache_salt: str | None = None


def parse_completion_request(body: bytes, service: ChatService) -> CompletionRequest:
    """Check a `/v1/chat/completions` body; raises a 4xx `ChatStreamError` naming the problem."""
    data = parse_json_object(body)
    model = data.get("model")
    if model is not None and model != service.name:
        raise NotFound(f"the model {quoted(model)} does not exist; this server serves {service.name!r}")
    if data.get("n", 1) != 1:
        raise InvalidRequest("only n=1 is supported")
    for key in _UNSUPPORTED:
        if data.get(key):
            raise InvalidRequest(f"{key!r} is not supported by this server")
    if data.get("logprobs"):
        raise InvalidRequest("'logprobs' is not supported by this server")
    messages = _messages(data.get("messages"))
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object")
    overrides: dict[str, Any] = {}
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        if data.get(key) is not None:
            overrides["max_new_tokens"] = data[key]
            break
    for key in ("temperature", "top_p"):
        if data.get(key) is not None:
            overrides[key] = data[key]
    stop = data.get("stop")
    if stop is not None:
        overrides["stop"] = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, list) and len(stop) > _MAX_STOP:
            raise InvalidParameter("stop", f"at most {_MAX_STOP} stop strings (OpenAI's limit), not {len(stop)}")
    try:
        params = service.params.with_overrides(overrides, max_new_tokens_limit=service.params.max_new_tokens)
    except InvalidParameter as error:
        if error.field != "max_new_tokens":
            raise
        name = next(k for k in ("max_completion_tokens", "max_tokens") if data.get(k) is not None)
        raise InvalidParameter(name, error.detail.split(": ", 1)[1]) from None
    if data.get("seed") is not None:
        params = replace(params, seed=data["seed"])
    return CompletionRequest(
        messages,
        params,
        stream,
        include_usage=bool(options.get("include_usage", False)),
        include_queue_status=bool(options.get("include_queue_status", False)),
        cache_salt=parse_cache_salt(data),
    )


def _messages(raw: object) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidRequest(f"messages[{index}] needs a role of {', '.join(_ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequest(f"messages[{index}]: only text content parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{index}].content must be a string or text parts")
        messages.append({"role": _ROLES[message["role"]], "content": content})
    return messages


async def chat_completions(
    endpoint: ChatEndpoint, request: Request, exchange: ChatExchange, callback: OutcomeCallback | None
) -> Response:
    """Answer one `POST /v1/chat/completions`: an error, or the completion once a slot is free."""
    service = endpoint.service
    try:
        completion = parse_completion_request(exchange.body, service)
        max_wait = queue_deadline(request.scope, service.max_queue_wait)
        client = client_identity(request.scope, service.trust_forwarded)
        # The conversation cache lends this request only what its own key (or address, without
        # keys) and salt left there.
        completion = replace(
            completion, params=replace(completion.params, cache_scope=cache_scope(client, completion.cache_salt))
        )
        ticket = service.enter(client, max_wait)
        # Queue chunks only for a client that asked: strict OpenAI clients see a silent wait.
        queued = ticket.slot is None and completion.stream and completion.include_queue_status
        slot = None if queued else await wait_for_slot(ticket, request, exchange, callback)
    except ChatStreamError as error:
        telemetry_of(request.scope).refused(error)
        return error_response(error, "openai", status_code=endpoint.refusal_status(error))
    prompt = ChatPrompt.from_messages(completion.messages)
    prompt.set_tokenizer(service.tokenizer)
    envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.name}

    def start(slot: Slot) -> _CompletionResponse:
        return _CompletionResponse(
            request=request,
            exchange=exchange,
            slot=slot,
            callback=callback,
            service=service,
            prompt=prompt,
            completion=completion,
            envelope=envelope,
        )

    def resume(slot: Slot) -> _CompletionResponse:
        response = start(slot)
        response.started = True  # the waiting response sent the head: a failure must come in-band
        return response

    if queued:
        return WaitingResponse(
            request=request,
            exchange=exchange,
            ticket=ticket,
            callback=callback,
            media_type=_EVENT_STREAM,
            headers=STREAM_HEADERS,
            queue_frame=lambda position, eta_s: _event(
                {**envelope, "object": "chat.completion.chunk", "choices": [], "queue": _queue(position, eta_s)}
            ),
            error_frame=lambda error: _event(error_body(error, "openai")),
            start=resume,
            release=_nothing_held,
        )
    if slot is None:
        await report_outcome(callback, request, CLIENT_DISCONNECTED_BEFORE_STREAMING)
        return client_closed_response()
    return start(slot)


def _queue(position: int, eta_s: float | None) -> dict[str, Any]:
    return {"position": position, "eta_s": eta_s}


def _event(data: dict[str, Any] | str) -> bytes:
    """An SSE event in OpenAI's framing (`\\n` line ends)."""
    return sse_event(data, line_end="\n")


async def _nothing_held() -> None:
    """A stateless request holds nothing while it waits (no session lock)."""


class _CompletionResponse(AdmittedResponse):
    """A completion, streamed as chunks or sent whole once generated."""

    def __init__(
        self,
        *,
        request: Request,
        exchange: ChatExchange,
        slot: Slot,
        callback: OutcomeCallback | None,
        service: ChatService,
        prompt: ChatPrompt,
        completion: CompletionRequest,
        envelope: dict[str, Any],
    ) -> None:
        media_type = _EVENT_STREAM if completion.stream else "application/json"
        super().__init__(
            request=request,
            exchange=exchange,
            slot=slot,
            callback=callback,
            media_type=media_type,
            headers=STREAM_HEADERS if completion.stream else {},
        )
        self._service = service
        self._prompt = prompt
        self._completion = completion
        self._base = envelope
        self.telemetry.content("prompt", completion.messages[-1]["content"])

    async def run(self, send: Send) -> str:
        params = self._completion.params
        async with self._service.generate(self._slot, self._prompt, params) as generation:
            self.stats = generation.stats
            if self._completion.stream:
                return await self._stream(send, generation)
            return await self._whole(send, generation)

    async def _stream(self, send: Send, generation: Generation) -> str:
        async def send_event(data: dict[str, Any] | str) -> None:
            await send({"type": "http.response.body", "body": _event(data), "more_body": True})

        parts: list[str] = []
        opened = False

        async def start() -> None:
            nonlocal opened
            if not opened:  # the head may be out already (a client that waited): the role chunk is not
                opened = True
                await self.start(send)
                await send_event(self._chunk({"role": "assistant", "content": ""}))

        async def send_text(text: str) -> None:
            parts.append(text)
            await start()
            await send_event(self._chunk({"content": text}))
            self.delivered = True

        async def send_ping() -> None:
            await start()
            await send({"type": "http.response.body", "body": sse_ping(line_end="\n"), "more_body": True})

        if not defers_head(generation):
            await start()
        failure = await relay(generation, self._exchange, send_text, send_ping, telemetry=self.telemetry)
        self.telemetry.content("reply", "".join(parts))
        outcome = self.outcome_after(failure)
        if not self.started and outcome != SUCCESS:
            await self.refuse_unstarted(send, outcome, failure)
            return outcome
        await start()
        if outcome == SUCCESS:
            await send_event(self._chunk({}, finish_reason=_finish_reason(generation.stats.finish_reason)))
            if self._completion.include_usage:
                await send_event({**self._envelope("chat.completion.chunk"), "choices": [], "usage": self._usage()})
            await send_event("[DONE]")
        elif failure is not None and outcome == UNKNOWN_ERROR_OCCURRED:
            error = failure.as_error()
            await send_event(error_body(error, "openai"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome

    async def send_failure(self, send: Send, error: GenerationError) -> None:
        await send_error(send, error, "openai")

    async def _whole(self, send: Send, generation: Generation) -> str:
        parts: list[str] = []

        async def collect(text: str) -> None:
            parts.append(text)

        failure = await relay(generation, self._exchange, collect, telemetry=self.telemetry)
        self.telemetry.content("reply", "".join(parts))
        outcome = self.outcome_after(failure)
        if outcome == CLIENT_DISCONNECTED_BEFORE_STREAMING:
            return outcome  # nobody is left to answer
        extra: dict[str, str] = {}
        if failure is not None:
            error = failure.as_error()
            body: dict[str, Any] = error_body(error, "openai")
            status, extra = error.status_code, error.headers()
        else:
            message = {"role": "assistant", "content": "".join(parts)}
            finish = _finish_reason(generation.stats.finish_reason)
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            body = {**self._envelope("chat.completion"), "choices": [choice], "usage": self._usage()}
            status = 200
        payload = json.dumps(body, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(name.lower().encode(), value.encode()) for name, value in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})
        self.delivered = True
        return outcome

    async def end_cut_short(self, send: Send, error: ShuttingDown) -> None:
        # Only a stream has started before its end, so this is always an SSE event.
        await send({"type": "http.response.body", "body": _event(error_body(error, "openai")), "more_body": False})

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {**self._base, "object": kind, "system_fingerprint": None}

    def _chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}

    def _usage(self) -> dict[str, int]:
        assert self.stats is not None
        prompt, completion = self.stats.prompt_tokens, self.stats.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
