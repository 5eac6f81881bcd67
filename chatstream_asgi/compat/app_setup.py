"""`chat_stream.append_apis(app)` and `chat_stream.append_middlewares(app)`: ChatStream's helpers, ours.

`append_apis` mounts the conversation APIs (and, as ChatStream does, `/chat_stream` and the
page) as routes of a Starlette or FastAPI app.

ChatStream's `append_middlewares` installs fastsession's session middleware, a role middleware
and, by default, CORS open to every origin. Here: `ChatStreamMiddleware` (sessions on every
path, the body replay, the disconnect watch; roles are checked by the handlers themselves), and
CORS only when `opts` asks for it, with the headers ChatStream's front-ends read exposed: a
server is not opened to every origin by default.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatstream_asgi.asgi.body import says_json
from chatstream_asgi.asgi.chat_endpoint import ChatServer
from chatstream_asgi.asgi.conversation_apis import API_METHODS, ApiOptions, enabled_apis, handle_api
from chatstream_asgi.asgi.http_errors import error_response
from chatstream_asgi.asgi.middleware import ChatStreamMiddleware
from chatstream_asgi.asgi.streaming import MESSAGE_ID_HEADER
from chatstream_asgi.asgi.webui import NEW_CHAT_NEEDS_JSON, NEW_CHAT_PATH, PAGE_FILES, ChatPage
from chatstream_asgi.errors import NotSupported, UnsupportedMediaType
from chatstream_asgi.sessions.lazy import LazySession

logger = logging.getLogger(__name__)

#: The response headers a cross-origin ChatStream front-end reads.
EXPOSED_HEADERS = ["X-ChatStream-API-DevTool-Enabled", MESSAGE_ID_HEADER]


def append_middlewares(
    server: ChatServer, app: Any, opts: dict[str, Any] | None, middleware_options: dict[str, Any]
) -> None:
    """Add `ChatStreamMiddleware` (with `middleware_options`) and, with `opts["cors"]`, CORS outside it.

    An origin CORS lets in by name may also post with the session cookie (the middleware's
    `allowed_origins`), and read the answers to requests that carried it. `"*"` lets every
    origin call the APIs, without credentials: a page of a sibling subdomain that could read
    `/get_history` with its visitor's cookie, or add headers to a cookie-carrying POST, would
    hold the visitor's conversation. So with `"*"` in the list no origin gets credentials, and
    a warning says so when origins are also named.
    """
    opts = opts or {}
    if "fast_session" in opts:
        logger.warning("append_middlewares: 'fast_session' options are ignored; sessions are ChatStreamMiddleware's")
    cors = opts.get("cors")
    every_origin = False
    if cors is not None:
        origins = list(cors.get("allow_origins", ["*"]))
        named = [origin for origin in origins if origin != "*"]
        every_origin = len(named) < len(origins)
        if every_origin and named:
            logger.warning(
                "append_middlewares: CORS allow_origins has '*', so no origin may send or read the session "
                "cookie, not even %s: list origins by name only to let their pages keep a conversation",
                ", ".join(named),
            )
        allowed = [*middleware_options.get("allowed_origins", ()), *([] if every_origin else named)]
        middleware_options = {**middleware_options, "allowed_origins": allowed}
    app.add_middleware(ChatStreamMiddleware, chat_stream=server, **middleware_options)
    if cors is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.get("allow_origins", ["*"]),
            allow_credentials=not every_origin,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
        )


def append_apis(server: ChatServer, app: Any, opts: ApiOptions) -> None:
    """Add the APIs `opts` switch on as routes of a Starlette or FastAPI `app`; with them, as
    ChatStream's `append_apis` does, `POST /chat_stream` and the chat page at `/` (its
    `webui_index`), initialised with `opts["web_ui_params"]`, unless `opts` leave them out."""
    endpoint = server.endpoint
    if _chat_route_enabled(opts):

        async def chat(request: Request) -> Response:
            return await server.handle_chat_stream_request(request)

        app.router.routes.append(Route("/chat_stream", chat, methods=["POST"], name="chat_stream"))
    page_opts = {key: value for key, value in opts.items() if key != "web_ui_params"}
    page_wanted = _page_enabled(page_opts)
    for key in ("include", "exclude"):  # the chat's and the page's names are valid here, but they are not APIs
        if key in page_opts:
            page_opts[key] = [name for name in page_opts[key] if name not in _PAGE_NAMES and name != "chat_stream"]
    for name in sorted(enabled_apis(page_opts)):

        async def api_route(request: Request, name: str = name) -> Response:
            return await handle_api(endpoint, name, request, opts)

        app.router.routes.append(Route(f"/{name}", api_route, methods=[API_METHODS[name]], name=name))
    if page_wanted:
        page = ChatPage(
            opts.get("web_ui_params"), model=endpoint.service.name, system_prompt=endpoint.allow_system_prompt
        )
        for path in PAGE_FILES:

            async def serve_file(request: Request, path: str = path) -> Response:
                response = page.response(path)
                assert response is not None  # every path of PAGE_FILES has its file
                return response

            app.router.routes.append(Route(path, serve_file, methods=["GET"]))
        app.router.routes.append(Route(NEW_CHAT_PATH, _new_chat, methods=["POST"], name="new_chat"))


async def _new_chat(request: Request) -> Response:
    """The page's "New chat" on an app's own routes: a fresh session from the middleware's
    sessions (`LazySession.start_new`); other session middleware has no way to start one.
    JSON `Content-Type` only, as on the middleware's own route (see there)."""
    if not says_json(request.scope):
        return error_response(UnsupportedMediaType(NEW_CHAT_NEEDS_JSON), "chatstream")
    session = getattr(request.state, "session", None)
    if not isinstance(session, LazySession):
        unsupported = NotSupported(
            "New chat needs ChatStreamMiddleware's sessions: chat_stream.append_middlewares(app)"
        )
        return error_response(unsupported, "chatstream")
    session.start_new()
    return JSONResponse({"success": True})


#: ChatStream's names of the page's routes (`/` and `/chatstream.js`).
_PAGE_NAMES = ("webui_index", "webui_js")


def _page_enabled(opts: ApiOptions) -> bool:
    """Whether ChatStream-style `opts` switch the page on (as ChatStream's `is_enabled("webui_index")`)."""
    if "include" in opts:
        return "webui_index" in opts["include"]
    if "exclude" in opts:
        return "webui_index" not in opts["exclude"]
    return bool(opts.get("all", False))


def _chat_route_enabled(opts: ApiOptions) -> bool:
    if "include" in opts:
        return "chat_stream" in opts["include"]
    if "exclude" in opts:
        return "chat_stream" not in opts["exclude"]
    return bool(opts.get("all"))
