"""The one place a `ChatStreamError` becomes HTTP, in each of the three shapes clients read.

- `plain`: `{"error": code, "detail": text}` (DESIGN §3), for `/chat_stream` and operational routes;
- `chatstream`: the same plus ChatStream's `{"success": false, "message": ...}`, which its
  conversation APIs answer with and its front-ends read;
- `openai`: OpenAI's `{"error": {"message", "type", "param", "code"}}`, for `/v1`.

Whether the error goes out as a Starlette response (an endpoint returns it) or on a raw ASGI
`send` (the middleware refuses before any app runs), the JSON comes from `error_body`, so the
shapes cannot drift between paths. (The raw plain and ChatStream refusals keep `json.dumps`'s
spacing, which clients have seen; `/v1` renders compactly everywhere.) A request whose client
already left is answered 499 (nginx's "client closed request"): nobody reads it, but servers and
logs see an honest status.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from starlette.responses import JSONResponse, Response
from starlette.types import Send

from chatstream_asgi.errors import ChatStreamError, GenerationError, InvalidParameter, RetryLater

ErrorShape = Literal["plain", "chatstream", "openai"]

#: nginx's code for "client closed request": the answer nobody receives after a client left.
CLIENT_CLOSED_REQUEST = 499

_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_body(error: ChatStreamError, shape: ErrorShape = "plain") -> dict[str, Any]:
    """The JSON object sent for `error` in `shape`."""
    if shape == "openai":
        kind = _OPENAI_TYPES.get(error.status_code)
        if kind is None:
            kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
        param = error.field if isinstance(error, InvalidParameter) else None
        return {"error": {"message": error.detail, "type": kind, "param": param, "code": error.code}}
    body: dict[str, Any] = {"success": False, "message": error.detail} if shape == "chatstream" else {}
    body |= {"error": error.code, "detail": error.detail}
    if isinstance(error, InvalidParameter):
        body["field"] = error.field
    if isinstance(error, (RetryLater, GenerationError)) and error.retry_after is not None:
        body["retry_after"] = error.retry_after
    return body


def error_response(error: ChatStreamError, shape: ErrorShape = "plain", *, status_code: int | None = None) -> Response:
    """A Starlette response for `error`; `status_code` overrides the status (ChatStream's 200 mode)."""
    return JSONResponse(
        error_body(error, shape),
        status_code=error.status_code if status_code is None else status_code,
        headers=error.headers(),
    )


async def send_error(send: Send, error: ChatStreamError, shape: ErrorShape = "plain") -> None:
    """Answer with `error` on a raw ASGI `send`, for refusals made before any app runs."""
    if shape == "openai":  # rendered as every other /v1 answer is (Starlette's compact JSON)
        response = error_response(error, shape)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})
        return
    payload = json.dumps(error_body(error, shape)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def client_closed_response() -> Response:
    """The response of a request whose client left before it was answered."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def send_client_closed(send: Send) -> None:
    """`client_closed_response` on a raw ASGI `send`."""
    await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
