"""`chat_stream.append_middlewares(app)`: what ChatStream's helper of that name installs, ours.

ChatStream's installs fastsession's session middleware, a role middleware and, by default, CORS
open to every origin. Here: `ChatStreamMiddleware` (sessions on every path, the body replay, the
disconnect watch; roles are checked by the handlers themselves), and CORS only when `opts`
asks for it, with the headers ChatStream's front-ends read exposed: a server is not opened to
every origin by default.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.middleware.cors import CORSMiddleware

from chatstream_asgi.asgi.streaming import MESSAGE_ID_HEADER

if TYPE_CHECKING:
    from chatstream_asgi.compat.chat_stream import ChatStream

logger = logging.getLogger(__name__)

#: The response headers a cross-origin ChatStream front-end reads.
EXPOSED_HEADERS = ["X-ChatStream-API-DevTool-Enabled", MESSAGE_ID_HEADER]


def append_middlewares(
    chat_stream: ChatStream, app: Any, opts: dict[str, Any] | None, middleware_options: dict[str, Any]
) -> None:
    """Add `ChatStreamMiddleware` (with `middleware_options`) and, with `opts["cors"]`, CORS outside it."""
    from chatstream_asgi.asgi.middleware import ChatStreamMiddleware  # the middleware module imports ChatStream

    opts = opts or {}
    if "fast_session" in opts:
        logger.warning("append_middlewares: 'fast_session' options are ignored; sessions are ChatStreamMiddleware's")
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream, **middleware_options)
    cors = opts.get("cors")
    if cors is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.get("allow_origins", ["*"]),
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
        )
