"""What one request tells operators: its id, the log lines that carry it, and what metrics count.

The middleware starts a `RequestTelemetry` for every route it serves and keeps it in the scope
(`chatstream_asgi.telemetry`), as it keeps the exchange; the chat path reports through it
(`refused`, `first_text`, `finished`), so every refusal and every outcome is counted in one place
whichever route or module produced it. The request id it makes is bound to the log lines of the
request through `chatstream_asgi.log`. Prompts and replies are logged only with `log_content=True`.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.types import Message, Scope, Send

from chatstream_asgi.log import request_logger

if TYPE_CHECKING:
    from chatstream_asgi.asgi.metrics import ChatMetrics
    from chatstream_asgi.engine.base import GenerationStats
    from chatstream_asgi.errors import ChatStreamError

TELEMETRY_KEY = "chatstream_asgi.telemetry"
REQUEST_ID_HEADER = "x-request-id"
#: The longest client-sent request id we keep; a longer or unprintable one is replaced.
MAX_REQUEST_ID_LENGTH = 128
# What a kept client id may hold: UUIDs, hex, base64 and dotted or colon-separated ids pass;
# spaces and brackets do not, since in a log line (`... [request <id>]`) they could pose as
# another line's words or another request's id.
_SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:/+=-]{{1,{MAX_REQUEST_ID_LENGTH}}}")

logger = request_logger(__name__)


def sane_request_id(value: str | None) -> str | None:
    """A client's `X-Request-Id` if it is worth keeping: 1 to 128 letters, digits and `._:/+=-`."""
    if value is None:
        return None
    value = value.strip()
    return value if _SAFE_REQUEST_ID.fullmatch(value) else None


class RequestTelemetry:
    """One request's id, clock and counters (see the module docstring)."""

    def __init__(self, request_id: str, metrics: ChatMetrics | None = None, *, log_content: bool = False) -> None:
        self.request_id = request_id
        self.metrics = metrics
        self.log_content = log_content
        self.started_at = time.monotonic()
        self._first_text_seen = False

    def refused(self, error: ChatStreamError) -> None:
        """Count and log a refusal (any 4xx/429/503 the package answers); every refusal ends here."""
        logger.info("refused with %s %s: %s", error.status_code, error.code, error.detail)
        if self.metrics is not None:
            self.metrics.rejected(error.code)

    def admitted(self, queue_wait: float) -> None:
        """A slot was granted after `queue_wait` seconds in the queue."""
        if self.metrics is not None:
            self.metrics.queue_wait.observe(queue_wait)

    def first_text(self) -> None:
        """The generation produced text; the first call times the first token."""
        if self._first_text_seen:
            return
        self._first_text_seen = True
        if self.metrics is not None:
            self.metrics.time_to_first_token.observe(time.monotonic() - self.started_at)

    def finished(self, outcome: str, stats: GenerationStats | None) -> None:
        """Count and log the one outcome of an admitted request."""
        prompt_tokens = stats.prompt_tokens if stats is not None else 0
        completion_tokens = stats.completion_tokens if stats is not None else 0
        duration = time.monotonic() - self.started_at
        logger.info(
            "chat ended: %s after %.2f s (%d prompt + %d completion tokens)",
            outcome,
            duration,
            prompt_tokens,
            completion_tokens,
        )
        if self.metrics is not None:
            cached = stats.cached_prompt_tokens if stats is not None else 0
            self.metrics.finished(outcome, duration, prompt_tokens, completion_tokens, cached)

    def content(self, what: str, text: str) -> None:
        """Log a prompt or a reply, only where `log_content=True` asked for it."""
        if self.log_content:
            logger.info("%s: %r", what, text)


def start_request(scope: Scope, metrics: ChatMetrics | None, *, log_content: bool) -> RequestTelemetry:
    """Begin a served request: its id (the client's sane one, else a new one) goes in the scope."""
    request_id = sane_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER)) or secrets.token_hex(16)
    telemetry = RequestTelemetry(request_id, metrics, log_content=log_content)
    scope[TELEMETRY_KEY] = telemetry
    return telemetry


def telemetry_of(scope: Scope) -> RequestTelemetry:
    """The request's telemetry; a request the middleware did not start gets one (no metrics)."""
    telemetry = scope.get(TELEMETRY_KEY)
    if not isinstance(telemetry, RequestTelemetry):
        telemetry = scope[TELEMETRY_KEY] = RequestTelemetry(secrets.token_hex(16))
    return telemetry


def send_with_request_id(send: Send, request_id: str) -> Send:
    """`send`, adding `X-Request-Id` to the response head unless the app set one itself."""
    header = (REQUEST_ID_HEADER.encode(), request_id.encode())

    async def send_and_tag(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if all(name.lower() != header[0] for name, _ in headers):
                message = {**message, "headers": [*headers, header]}
        await send(message)

    return send_and_tag
