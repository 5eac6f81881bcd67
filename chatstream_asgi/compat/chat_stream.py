"""`ChatStream`: the facade a ChatStream user already knows, over the package's own parts.

The constructor takes ChatStream's arguments, resolves ChatStream's defaults and mock modes,
and builds a `ChatService` (engines, admission, parameters) and a `ChatEndpoint` over it;
`handle_chat_stream_request` and ChatStream's per-API handlers delegate to them. Nothing below
this layer knows the facade exists: the middleware takes it as a `ChatServer` (anything with an
`endpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import transformers
from starlette.requests import Request
from starlette.responses import Response

from chatstream_asgi.asgi.chat_endpoint import ChatEndpoint
from chatstream_asgi.asgi.conversation_apis import ApiOptions, handle_api
from chatstream_asgi.asgi.wire import CHATSTREAM_EOS, StreamFormat, check_stream_format
from chatstream_asgi.compat.app_setup import append_apis, append_middlewares
from chatstream_asgi.compat.defaults import DEFAULT, resolve_defaults
from chatstream_asgi.compat.mock import mock_engine
from chatstream_asgi.compat.roles import ClientRoles
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.engine.base import Engine
from chatstream_asgi.errors import ChatStreamError, InvalidParameter
from chatstream_asgi.frontends.console import ConsoleConversation
from chatstream_asgi.outcomes import OutcomeCallback
from chatstream_asgi.runtime.admission import Admission, AdmissionPolicy
from chatstream_asgi.runtime.service import ChatService, check_model_arguments, check_service_options
from chatstream_asgi.sessions.attached import FallbackSessions

#: ChatStream constructor arguments that have no counterpart here: accepted, warned about, ignored.
_IGNORED_CHATSTREAM_ARGS = frozenset(
    {
        "token_sampler",
        "repetition_penalty_method",
        "add_special_tokens",
        "request_handler",
        "locale",
        "probe_mode_enabled",
    }
)


class ChatStream:
    """Streams chat replies from a model, with admission, sessions and outcome callbacks.

    Pass a Hugging Face `model` and `tokenizer` (as with ChatStream), or a ready `engine`.
    `devices=["cuda:0", "cuda:1"]` (or ChatStream's `num_gpus=2`) runs one replica of the model
    per device, each its own copy; `num_of_concurrent_executions` then counts per replica.
    A local model runs on the `BatchingEngine` (concurrent chats share forward passes) when it
    can; `batching=False` picks `TransformersEngine` (one `model.generate` per slot) instead.
    `conversation_cache_bytes`, `prefill_chunk_tokens` and `prompt_lookup_num_tokens` (the most
    tokens a chat drafts a step by prompt lookup; None: 24; 0: off) tune the batching engine (see it). Its
    conversation cache is partitioned by tenant (session, API key or client address, and the
    request's `cache_salt`); `cache_shared_system_prompt` declares a system text whose rendered
    beginning every tenant may share, so a common system prompt is prefilled once.
    `max_queue_wait` (seconds) bounds a request's wait for a slot: past it, 503 `queue_timeout`.
    `admission="fair"` takes turns between clients (API keys, else addresses; `X-Forwarded-For`
    only with `trust_forwarded=True`) instead of serving waiters in arrival order.
    `allow_system_prompt=True` lets a chat carry its own `system` text (the page's system prompt);
    off, a client cannot replace the system text the app's prompt class sets.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: str | None = "auto",
        num_of_concurrent_executions: int = 2,
        max_queue_size: int = 5,
        too_many_request_as_http_error: bool = DEFAULT,
        chat_prompt_clazz: type[AbstractChatPrompt] | None = None,
        max_new_tokens: int = 256,
        context_len: int = DEFAULT,
        temperature: float = DEFAULT,
        top_k: int | None = DEFAULT,
        top_p: float | None = DEFAULT,
        repetition_penalty: float | None = 1.0,
        seed: int | None = DEFAULT,
        stop: list[str] | None = None,
        stream_format: StreamFormat = DEFAULT,
        name: str | None = DEFAULT,
        *,
        engine: Engine | None = None,
        devices: list[str] | None = None,
        num_gpus: int | None = None,
        use_mock_response: bool = False,
        mock_params: dict[str, Any] | None = DEFAULT,
        client_roles: dict[str, Any] | None = DEFAULT,
        logger: logging.Logger | None = None,
        compat: str | None = None,
        batching: bool | None = None,
        conversation_cache_bytes: int | None = None,
        prefill_chunk_tokens: int | None = None,
        prompt_lookup_num_tokens: int | None = None,
        cache_shared_system_prompt: str | None = None,
        max_queue_wait: float | None = None,
        admission: AdmissionPolicy = "fifo",
        trust_forwarded: bool = False,
        allow_system_prompt: bool = False,
        **chatstream_options: Any,
    ) -> None:
        chosen = resolve_defaults(
            compat,
            name=name,
            too_many_request_as_http_error=too_many_request_as_http_error,
            context_len=context_len,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stream_format=stream_format,
            client_roles=client_roles,
            mock_params=mock_params,
        )
        #: ChatStream's `logger`: the one passed, else this package's; the package's own modules
        #: log under `chatstream_asgi.*` whichever it is.
        self.logger = logger if logger is not None else logging.getLogger("chatstream_asgi")
        unknown = set(chatstream_options) - _IGNORED_CHATSTREAM_ARGS
        if unknown:
            raise TypeError(f"ChatStream() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        if chatstream_options:
            logging.getLogger(__name__).warning(  # `logger` here is the argument
                "ChatStream arguments without a counterpart in chatstream-asgi are ignored: %s",
                ", ".join(sorted(chatstream_options)),
            )
        # Everything that can be refused is refused before a model is placed, in ChatStream's terms.
        check_stream_format(chosen["stream_format"])
        check_service_options(
            admission=admission,
            max_queue_wait=max_queue_wait,
            context_len=chosen["context_len"],
            max_new_tokens=max_new_tokens,
        )
        try:
            # ChatStream's None means "off" for these knobs.
            params = GenerationParams(
                max_new_tokens=max_new_tokens,
                temperature=chosen["temperature"],
                top_k=chosen["top_k"] or 0,
                top_p=1.0 if chosen["top_p"] is None else chosen["top_p"],
                repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                stop=tuple(stop or ()),
            )
        except InvalidParameter as error:  # a configuration mistake, not a client's
            raise ValueError(f"ChatStream(): {error.detail}") from None
        if devices is None and num_gpus:  # ChatStream's way to ask for one replica per GPU
            devices = [f"cuda:{index}" for index in range(num_gpus)]
        if use_mock_response and engine is None:
            engine = mock_engine(chosen["mock_params"])
        check_model_arguments(
            model,
            tokenizer,
            engine,
            devices,
            chat_prompt_clazz,
            owner="ChatStream",
            prompt_option="chat_prompt_clazz=",
            devices_option="devices= (or num_gpus=)",
        )
        #: ChatStream's `client_roles` dict as given (None: every mounted API is open), and its rules.
        self.client_roles: dict[str, Any] | None = chosen["client_roles"]
        self.roles = ClientRoles(self.client_roles) if self.client_roles is not None else None
        self.service = ChatService(
            params=params,
            model=model,
            tokenizer=tokenizer,
            engine=engine,
            device=device,
            devices=devices,
            concurrency=num_of_concurrent_executions,
            max_queue_size=max_queue_size,
            prompt_class=chat_prompt_clazz,
            context_len=chosen["context_len"],
            name=chosen["name"],
            batching=batching,
            conversation_cache_bytes=conversation_cache_bytes,
            prefill_chunk_tokens=prefill_chunk_tokens,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens,
            cache_shared_system_prompt=cache_shared_system_prompt,
            max_queue_wait=max_queue_wait,
            admission=admission,
            trust_forwarded=trust_forwarded,
        )
        if chosen["seed"] is not None:
            transformers.set_seed(chosen["seed"])
        #: What `ChatStreamMiddleware` and the routes answer through (`ChatServer`).
        self.endpoint = ChatEndpoint(
            self.service,
            stream_format=chosen["stream_format"],
            too_many_request_as_http_error=chosen["too_many_request_as_http_error"],
            rules=self.roles,
            allow_system_prompt=allow_system_prompt,
        )
        self._console: ConsoleConversation | None = None  # handle_console_input's conversation

    # The service's and the endpoint's state, under ChatStream's names.

    @property
    def engines(self) -> list[Engine]:
        """One engine per model replica."""
        return self.service.engines

    @property
    def engine(self) -> Engine:
        """The engine (the first replica's, when there are several)."""
        return self.service.engine

    @property
    def admission(self) -> Admission:
        """The slots and the wait queue shared by the replicas."""
        return self.service.admission

    @property
    def params(self) -> GenerationParams:
        """The server's generation parameters (a session's own override them)."""
        return self.service.params

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        return self.service.tokenizer

    @property
    def chat_prompt_clazz(self) -> type[AbstractChatPrompt]:
        """The prompt class conversations are kept in."""
        return self.service.prompt_class

    @property
    def context_len(self) -> int:
        """Tokens the prompt and the reply share."""
        return self.service.context_len

    @property
    def name(self) -> str:
        """The model's name (`/v1/models`, the page, `/get_load`)."""
        return self.service.name

    @property
    def max_queue_wait(self) -> float | None:
        """Seconds a request may wait for a slot before 503 `queue_timeout` (None: as long as it takes)."""
        return self.service.max_queue_wait

    @property
    def trust_forwarded(self) -> bool:
        """Whether the client address for fair turns may come from `X-Forwarded-For`."""
        return self.service.trust_forwarded

    @property
    def stream_format(self) -> StreamFormat:
        """The wire format of a request that asks for none."""
        return self.endpoint.stream_format

    @property
    def too_many_request_as_http_error(self) -> bool:
        """False: a full queue is answered 200 + error JSON, as ChatStream does."""
        return self.endpoint.too_many_request_as_http_error

    @property
    def fallback_sessions(self) -> FallbackSessions:
        """Sessions for requests that reach the handler with none attached (no middleware in front)."""
        return self.endpoint.fallback_sessions

    @property
    def ready(self) -> bool:
        """True once every replica can generate (`/ready`)."""
        return self.service.ready

    async def check_ready(self) -> bool:
        """`ready`, and for engines that generate elsewhere, whether that server answers now."""
        return await self.service.check_ready()

    def load(self) -> dict[str, int]:
        """Generations running and waiting, and the limits."""
        return self.service.load()

    async def start_queue_worker(self) -> None:
        """Accepted for ChatStream compatibility; admission needs no worker task here."""

    def create_chat_prompt(self) -> AbstractChatPrompt:
        """A new, empty conversation of this server's prompt class."""
        return self.service.create_chat_prompt()

    def prompt_from_dict(self, data: dict[str, Any]) -> AbstractChatPrompt:
        """A conversation restored from its `to_dict()` form (as stored in a session)."""
        return self.service.prompt_from_dict(data)

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | str | None = None, callback: OutcomeCallback | None = None
    ) -> Response:
        """Answer one `POST /chat_stream`: an error, or the streamed reply once a slot is free.

        `request_body` is optional behind `ChatStreamMiddleware`, which replays the body.
        Without the middleware (any path, any app) the handler reads the body, finds the
        session and watches the client itself (`asgi.standalone`).
        `callback(request, outcome)` is called exactly once if the request reached admission.
        """
        return await self.endpoint.handle(request, request_body, callback)

    def refusal_status(self, error: ChatStreamError) -> int:
        """The HTTP status of a refusal (ChatStream's 200 for a full queue when asked for)."""
        return self.endpoint.refusal_status(error)

    def append_apis(self, app: Any, opts: ApiOptions | None = None) -> None:
        """Mount ChatStream's conversation APIs on a Starlette/FastAPI `app`, as ChatStream does.

        `opts`: `{"all": True}`, `{"include": [...]}` or `{"exclude": [...]}`, plus optionally
        `"on_feedback_received": fn`. The middleware attaches sessions on these paths.
        """
        append_apis(self, app, opts or {})

    def append_middlewares(self, app: Any, opts: dict[str, Any] | None = None, **middleware_options: Any) -> None:
        """Install `ChatStreamMiddleware` on `app` (keyword arguments are its options) and, with
        ChatStream's `opts={"cors": {"allow_origins": [...]}}`, CORS exposing ChatStream's headers."""
        append_middlewares(self, app, opts, middleware_options)

    async def handle_console_input(self, user_input: str) -> AsyncIterator[tuple[str, str, str]]:
        """ChatStream's console API: the reply to `user_input` in one conversation kept for the
        console, streamed as ChatStream yields it: `(reply so far + "<::EOS::>", new text, pos)`,
        `pos` "begin" for the first piece, then "mid". Same engine, prompt and admission as the server.
        """
        if self._console is None:
            self._console = ConsoleConversation(self.service)
        reply = ""
        async for text in self._console.reply(user_input):
            pos = "mid" if reply else "begin"
            reply += text
            yield reply + CHATSTREAM_EOS, text, pos

    # ChatStream's per-API handlers, for endpoints written against them.

    async def handle_clear_context_request(self, request: Request) -> Response:
        """`POST /clear_context`: forget this session's conversation."""
        return await handle_api(self.endpoint, "clear_context", request, {})

    async def handle_get_prompt_request(self, request: Request) -> Response:
        """`GET /get_prompt`: the current prompt text (URL-quoted, as ChatStream sends it)."""
        return await handle_api(self.endpoint, "get_prompt", request, {})

    async def handle_set_generation_params_request(self, request: Request) -> Response:
        """`POST /set_generation_params`: this session's sampling parameters."""
        return await handle_api(self.endpoint, "set_generation_params", request, {})

    async def handle_get_generation_params_request(self, request: Request) -> Response:
        """`GET /get_generation_params`: the parameters this session's next turn uses."""
        return await handle_api(self.endpoint, "get_generation_params", request, {})

    async def handle_set_feedback_request(self, request: Request, opts: ApiOptions | None = None) -> Response:
        """`POST /set_feedback`: hand a like/dislike on a message to `opts["on_feedback_received"]`."""
        return await handle_api(self.endpoint, "set_feedback", request, opts or {})

    async def handle_get_load_request(self, request: Request) -> Response:
        """`GET /get_load`: generations running and waiting."""
        return await handle_api(self.endpoint, "get_load", request, {})

    async def handle_get_resource_usage_request(self, request: Request) -> Response:
        """`GET /get_resource_usage`: process and GPU memory."""
        return await handle_api(self.endpoint, "get_resource_usage", request, {})

    def close(self) -> None:
        """Stop the engines' threads: they finish what they run first, and this waits for them
        (bounded), so call it off the event loop (`anyio.to_thread.run_sync(chat_stream.close)`)."""
        self.service.close()
