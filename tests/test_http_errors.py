"""Errors become HTTP in one place: a refusal says the same (status, headers, JSON) whether the
middleware sends it before any app runs or an endpoint returns it, in each of the three shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream_asgi.asgi.http_errors import ErrorShape, error_response, send_error
from chatstream_asgi.errors import ChatStreamError, InvalidParameter, TooManyRequests, Unauthorized

ERRORS = [
    TooManyRequests("every slot is busy", retry_after=2.5),
    InvalidParameter("temperature", "must be between 0 and 2, not 'hot'"),
    Unauthorized("a bearer key is needed"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["plain", "chatstream", "openai"])
@pytest.mark.parametrize("error", ERRORS, ids=lambda error: error.code)
async def test_a_refusal_sent_raw_says_what_an_endpoints_refusal_says(
    error: ChatStreamError, shape: ErrorShape
) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await send_error(send, error, shape)
    returned = error_response(error, shape)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == returned.status_code
    headers = {name: value for name, value in sent[0]["headers"] if name != b"content-length"}
    assert headers == {name: value for name, value in returned.raw_headers if name != b"content-length"}
    assert json.loads(sent[1]["body"]) == json.loads(returned.body) and sent[1]["more_body"] is False
