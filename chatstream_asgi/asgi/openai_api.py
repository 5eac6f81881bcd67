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
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from chatstream_asgi.asgi.exchange import ChatExchange
from chatstream_asgi.asgi.streaming import (
    CLIENT_DISCONNECTED_BEFORE_STREAMING,
    STREAM_HEADERS,
    SUCCESS,
    UNKNOWN_ERROR_OCCURRED,
    AdmittedResponse,
    OutcomeCallback,
    defers_head,
    relay,
    report_outcome,
    wait_for_slot,
)
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.asgi.waiting import WaitingResponse, client_identity, queue_deadline
from chatstream_asgi.core.params import GenerationParams, parse_json_object
from chatstream_asgi.core.prompt import ChatPrompt
from chatstream_asgi.errors import (
    ChatStreamError,
    GenerationError,
    InvalidParameter,
    InvalidRequest,
    NotFound,
    ShuttingDown,
    quoted,
)

if TYPE_CHECKING:
    from chatstream_asgi.compat.chat_stream import ChatStream
    from chatstream_asgi.engine.base import Engine
    from chatstream_asgi.runtime.admission import Slot

_CREATED = int(time.time())
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call")
_MAX_STOP = 4
_EVENT_STREAM = "text/event-stream; charset=utf-8"


def openai_error(error: ChatStreamError, *, status_code: int | None = None) -> JSONResponse:
    """`error` in OpenAI's shape."""
    return JSONResponse(openai_error_body(error), status_code=status_code or error.status_code, headers=error.headers())


def openai_error_body(error: ChatStreamError) -> dict[str, Any]:
    """OpenAI's `{"error": {"message", "type", "param", "code"}}` for `error`."""
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(error.status_code)
    if kind is None:
        kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
    return {
        "error": {
            "message": error.detail,
            "type": kind,
            "param": error.field if isinstance(error, InvalidParameter) else None,
            "code": error.code,
        }
    }


def models_response(chat_stream: ChatStream) -> JSONResponse:
    """`GET /v1/models`: the one model this server serves, under its `name`."""
    model = {"id": chat_stream.name, "object": "model", "created": _CREATED, "owned_by": "chatstream-asgi"}
    return JSONResponse({"object": "list", "data": [model]})


@dataclass(frozen=True)
class CompletionRequest:
    """A validated `/v1/chat/completions` body."""

    messages: list[dict[str, str]]
    params: GenerationParams
    stream: bool
    include_usage: bool
    include_queue_status: bool


def parse_completion_request(body: bytes, chat_stream: ChatStream) -> CompletionRequest:
    """Check a `/v1/chat/completions` body; raises a 4xx `ChatStreamError` naming the problem."""
    data = parse_json_object(body)
    model = data.get("model")
    if model is not None and model != chat_stream.name:
        raise NotFound(f"the model {quoted(model)} does not exist; this server serves {chat_stream.name!r}")
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
        params = chat_stream.params.with_overrides(overrides, max_new_tokens_limit=chat_stream.params.max_new_tokens)
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
    chat_stream: ChatStream, request: Request, exchange: ChatExchange, callback: OutcomeCallback | None
) -> Response:
    """Answer one `POST /v1/chat/completions`: an error, or the completion once a slot is free."""
    try:
        completion = parse_completion_request(exchange.body, chat_stream)
        max_wait = queue_deadline(request.scope, chat_stream.max_queue_wait)
        ticket = chat_stream.admission.enter(client_identity(request.scope, chat_stream.trust_forwarded), max_wait)
        # Queue chunks only for a client that asked: strict OpenAI clients see a silent wait.
        queued = ticket.slot is None and completion.stream and completion.include_queue_status
        slot = None if queued else await wait_for_slot(ticket, request, exchange, callback)
    except ChatStreamError as error:
        telemetry_of(request.scope).refused(error)
        return openai_error(error, status_code=chat_stream.refusal_status(error))
    prompt = ChatPrompt.from_messages(completion.messages)
    prompt.set_tokenizer(chat_stream.tokenizer)
    envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat_stream.name}

    def start(slot: Slot) -> _CompletionResponse:
        return _CompletionResponse(
            request=request,
            exchange=exchange,
            slot=slot,
            callback=callback,
            engine=chat_stream.engines[slot.replica],
            prompt=prompt,
            completion=completion,
            envelope=envelope,
            context_len=chat_stream.context_len,
        )

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
            error_frame=lambda error: _event(openai_error_body(error)),
            start=start,
            release=_nothing_held,
        )
    if slot is None:
        await report_outcome(callback, request, CLIENT_DISCONNECTED_BEFORE_STREAMING)
        return Response(status_code=499)
    return start(slot)


def _queue(position: int, eta_s: float) -> dict[str, Any]:
    return {"position": position, "eta_s": eta_s}


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


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
        engine: Engine,
        prompt: ChatPrompt,
        completion: CompletionRequest,
        envelope: dict[str, Any],
        context_len: int,
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
        self._engine = engine
        self._prompt = prompt
        self._completion = completion
        self._base = envelope
        self._context_len = context_len
        self.telemetry.content("prompt", completion.messages[-1]["content"])

    async def run(self, send: Send) -> str:
        params = self._completion.params
        async with self._engine.generate(self._prompt, params, context_len=self._context_len) as generation:
            self.stats = generation.stats
            if self._completion.stream:
                return await self._stream(send, generation)
            return await self._whole(send, generation)

    async def _stream(self, send: Send, generation: Any) -> str:
        async def send_event(data: dict[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True})

        parts: list[str] = []

        async def start() -> None:
            if not self.started:
                await self.start(send)
                await send_event(self._chunk({"role": "assistant", "content": ""}))

        async def send_text(text: str) -> None:
            parts.append(text)
            await start()
            await send_event(self._chunk({"content": text}))
            self.delivered = True

        async def send_ping() -> None:
            await start()
            await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})

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
            error = {"message": str(failure), "type": "server_error", "param": None, "code": "generation_failed"}
            await send_event({"error": error})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome

    async def send_failure(self, send: Send, error: GenerationError) -> None:
        response = openai_error(error)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})

    async def _whole(self, send: Send, generation: Any) -> str:
        parts: list[str] = []

        async def collect(text: str) -> None:
            parts.append(text)

        failure = await relay(generation, self._exchange, collect, telemetry=self.telemetry)
        self.telemetry.content("reply", "".join(parts))
        outcome = self.outcome_after(failure)
        if outcome == CLIENT_DISCONNECTED_BEFORE_STREAMING:
            return outcome  # nobody is left to answer
        if failure is not None:
            body: dict[str, Any] = {
                "error": {"message": str(failure), "type": "server_error", "param": None, "code": "generation_failed"}
            }
            status = failure.status_code
        else:
            message = {"role": "assistant", "content": "".join(parts)}
            finish = _finish_reason(generation.stats.finish_reason)
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            body = {**self._envelope("chat.completion"), "choices": [choice], "usage": self._usage()}
            status = 200
        payload = json.dumps(body, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})
        self.delivered = True
        return outcome

    async def end_cut_short(self, send: Send, error: ShuttingDown) -> None:
        # Only a stream has started before its end, so this is always an SSE event.
        await send({"type": "http.response.body", "body": _event(openai_error_body(error)), "more_body": False})

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
