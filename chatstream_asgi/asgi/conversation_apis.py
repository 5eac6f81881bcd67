"""ChatStream's conversation APIs: `/clear_context`, `/get_prompt`, generation parameters,
feedback, load and resource usage; and `/get_history`, from which the chat page restores a
conversation.

Names, request keys and success shapes (`{"success": true, "message": ...}`) are ChatStream's,
so its front-ends keep working. Errors differ on purpose: ChatStream answered 200 with
`"success": false`; here they carry a real 4xx/5xx status and DESIGN's `error` code as well.
The handlers are served by the middleware (`apis=`) or mounted on an app (`append_apis`).
"""

from __future__ import annotations

import inspect
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream_asgi.asgi.chat_endpoint import ChatEndpoint
from chatstream_asgi.asgi.client_rules import refusal
from chatstream_asgi.asgi.http_errors import error_response
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.core.params import parse_json_object, session_params_update, session_params_view
from chatstream_asgi.core.prompt import RoleType
from chatstream_asgi.errors import ChatStreamError, InvalidRequest, NotFound, SessionBusy, quoted
from chatstream_asgi.log import request_logger
from chatstream_asgi.sessions.attached import attached_session
from chatstream_asgi.sessions.store import CHAT_PROMPT_KEY, GENERATION_PARAMS_KEY, TurnSession

logger = request_logger(__name__)

ApiOptions = dict[str, Any]
_Handler = Callable[[ChatEndpoint, Request, ApiOptions], Awaitable[Response]]

#: The HTTP method of each API, by ChatStream's name (its path is "/" + name).
API_METHODS: dict[str, str] = {
    "clear_context": "POST",
    "get_prompt": "GET",
    "set_generation_params": "POST",
    "get_generation_params": "GET",
    "set_feedback": "POST",
    "get_load": "GET",
    "get_resource_usage": "GET",
    "get_history": "GET",
}
#: The APIs that read or change a conversation, and so need the session.
SESSION_APIS = frozenset(
    {"clear_context", "get_prompt", "set_generation_params", "get_generation_params", "set_feedback", "get_history"}
)
#: The APIs the chat page calls: `webui=True` serves them with the page.
PAGE_APIS = frozenset(
    {"get_history", "clear_context", "set_feedback", "set_generation_params", "get_generation_params"}
)
#: Names ChatStream's opts also accept, switched on elsewhere here.
_OWN_OPTIONS = {
    "chat_stream": "POST /chat_stream is served with serve=True (or your own endpoint)",
    "webui_index": "the chat page is served with webui=True",
    "webui_js": "the chat page is served with webui=True",
}


def enabled_apis(opts: ApiOptions | None) -> frozenset[str]:
    """The API names ChatStream-style `opts` switch on: `{"all": True}`, `{"include": [...]}` or
    `{"exclude": [...]}` (one of them); None switches nothing on."""
    if not opts:
        return frozenset()
    chosen = [key for key in ("all", "include", "exclude") if key in opts]
    if len(chosen) != 1:
        raise ValueError(f"apis takes exactly one of 'all', 'include', 'exclude'; got {chosen or 'none'}")
    names = list(opts.get("include", [])) + list(opts.get("exclude", []))
    for name in names:
        if name in _OWN_OPTIONS:
            raise ValueError(f"API {name!r} is not mounted by apis=: {_OWN_OPTIONS[name]}")
        if name not in API_METHODS:
            raise ValueError(f"unknown API {name!r}; known: {', '.join(API_METHODS)}")
    if "include" in opts:
        return frozenset(opts["include"])
    if "exclude" in opts:
        return frozenset(API_METHODS) - set(opts["exclude"])
    return frozenset(API_METHODS) if opts["all"] else frozenset()


async def handle_api(endpoint: ChatEndpoint, name: str, request: Request, opts: ApiOptions) -> Response:
    """Answer the API `name`; refusals in ChatStream's shape with a real status."""
    if endpoint.rules is not None:
        session = attached_session(request, endpoint.fallback_sessions)
        denied = refusal(endpoint.rules, request, session.get_session() if session else None, name)
        if denied is not None:
            return denied
    try:
        return await _HANDLERS[name](endpoint, request, opts)
    except ChatStreamError as error:
        telemetry_of(request.scope).refused(error)
        return error_response(error, "chatstream")


def session_of(endpoint: ChatEndpoint, request: Request) -> TurnSession:
    """The session the middleware (or another, such as fastsession's) attached; a clear error if none did."""
    session = attached_session(request, endpoint.fallback_sessions)
    if session is None:
        raise RuntimeError(
            f"{request.url.path} needs a session: put ChatStreamMiddleware in front of the app "
            "(app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)) or a session middleware "
            "such as fastsession's FastSessionMiddleware"
        )
    return session


@asynccontextmanager
async def _changing(session: TurnSession) -> AsyncIterator[dict[str, Any]]:
    """Change a session between turns: a running turn would overwrite the change when it ends."""
    if not await session.lock_turn():
        raise SessionBusy(
            "a turn of this conversation is running: try again once the reply has ended (retry after Retry-After)"
        )
    try:
        yield session.get_session()
        session.save_session()
        await session.persist()
    finally:
        await session.unlock_turn()


async def _clear_context(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    async with _changing(session_of(endpoint, request)) as data:
        data.pop(CHAT_PROMPT_KEY, None)
    return JSONResponse({"success": True, "message": "Context successfully cleared"})


async def _get_history(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    """The cookie's own conversation as messages (DESIGN §7), for the page to restore on reload.

    The history is kept in the model's spelling (Rinna's "<NL>"); the prompt class's output
    replacements turn it back into what people were shown.
    """
    prompt = session_of(endpoint, request).get_session().get(CHAT_PROMPT_KEY)
    messages = []
    if prompt is not None:
        shown = prompt.get_replacement_when_output()
        for content in prompt.chat_contents:
            role = _HISTORY_ROLES.get(content.get_role_type())
            text = content.get_message()
            if role is not None and text is not None:  # None: a reply still to come
                text = prompt.replace_string(text, shown)
                messages.append({"role": role, "content": text, "id": content.get_message_id()})
    return JSONResponse({"success": True, "message": "success", "messages": messages})


_HISTORY_ROLES = {RoleType.REQUESTER: "user", RoleType.RESPONDER: "assistant"}


async def _get_prompt(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    prompt = session_of(endpoint, request).get_session().get(CHAT_PROMPT_KEY)
    if prompt is None or prompt.is_empty():
        return JSONResponse({"success": True, "message": "no prompt", "prompt": None})
    text = await anyio.to_thread.run_sync(prompt.create_prompt)  # a long history renders off the loop
    # URL-quoted, as ChatStream's front-ends decode it.
    return JSONResponse({"success": True, "message": "success", "prompt": urllib.parse.quote(text)})


async def _set_generation_params(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    update = parse_json_object(await request.body())
    async with _changing(session_of(endpoint, request)) as data:
        stored = session_params_update(data.get(GENERATION_PARAMS_KEY, {}), update, defaults=endpoint.service.params)
        data[GENERATION_PARAMS_KEY] = stored
    view = session_params_view(stored, endpoint.service.params)
    return JSONResponse({"success": True, "message": "success", "generation_params": view})


async def _get_generation_params(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    stored = session_of(endpoint, request).get_session().get(GENERATION_PARAMS_KEY, {})
    view = session_params_view(stored, endpoint.service.params)
    return JSONResponse({"success": True, "message": "success", "generation_params": view})


async def _set_feedback(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    session = session_of(endpoint, request)
    feedback = parse_json_object(await request.body())
    message_id = feedback.get("message_id")
    if not isinstance(message_id, str):
        raise InvalidRequest("'message_id' (from X-ChatStream-Last-Generated-Message-Id) is required")
    is_like = feedback.get("is_like", False)
    if not isinstance(is_like, bool):
        raise InvalidRequest("'is_like' must be a boolean")
    data = session.get_session()
    prompt = data.get(CHAT_PROMPT_KEY)
    target = prompt.find_chat_content_by_message_id(message_id) if prompt is not None else None
    if prompt is None or target is None:
        raise NotFound(f"no message {quoted(message_id)} in this conversation")
    feedback_data = {
        "is_like": is_like,
        "form_data": feedback.get("form_data", ""),
        "prompt": await anyio.to_thread.run_sync(prompt.create_prompt, {"to_message_id": message_id}),
        "target_message_id": message_id,
        "target_message": target.get_message(),
        "generation_params": session_params_view(data.get(GENERATION_PARAMS_KEY, {}), endpoint.service.params),
    }
    receiver = opts.get("on_feedback_received")
    if receiver is not None:
        try:
            result = receiver(feedback_data)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the user's receiver must not turn a recorded feedback into a 500
            logger.exception("on_feedback_received raised")
    return JSONResponse({"success": True, "message": "success", "target_message_id": message_id})


async def _get_load(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    load = endpoint.service.admission.load()
    worker = {
        "name": endpoint.service.name,
        "processing": load.processing,
        "waiting": load.waiting,
        "max_processing": load.num_of_concurrent_executions,
        "max_waiting": load.max_queue_size,
    }
    return JSONResponse({"success": True, "message": "success", "chatstream_workers": [worker]})


async def _get_resource_usage(endpoint: ChatEndpoint, request: Request, opts: ApiOptions) -> Response:
    usage = await anyio.to_thread.run_sync(_memory_usage)  # /proc reads and CUDA queries stay off the loop
    memory_usage = [{"name": endpoint.service.name, **usage}]
    return JSONResponse({"success": True, "message": "success", "memory_usage": memory_usage})


def _memory_usage() -> dict[str, Any]:
    """Process and GPU memory in GB, in ChatStream's shape."""
    import torch

    gib = 1024**3
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(
                {"index": index, "total_memory": round(total / gib, 2), "used_memory": round((total - free) / gib, 2)}
            )
    page = os.sysconf("SC_PAGE_SIZE")
    total_memory = os.sysconf("SC_PHYS_PAGES") * page
    try:
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[1]) * page
    except OSError:  # no procfs (macOS): peak resident size is the best the OS offers
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "num_gpus": len(gpus),
        "gpus": gpus,
        "cpu": {"total_memory": round(total_memory / gib, 2), "used_memory": round(used / gib, 2)},
    }


_HANDLERS: dict[str, _Handler] = {
    "clear_context": _clear_context,
    "get_prompt": _get_prompt,
    "set_generation_params": _set_generation_params,
    "get_generation_params": _get_generation_params,
    "set_feedback": _set_feedback,
    "get_load": _get_load,
    "get_resource_usage": _get_resource_usage,
    "get_history": _get_history,
}
