"""`ChatStream`: the facade a ChatStream user already knows, on a non-blocking core.

The constructor takes ChatStream's arguments. `handle_chat_stream_request` validates the
request, admits it (or says 429), and returns the streaming response. Everything that can be
refused is refused before a slot is taken, so a refusal never holds one.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import transformers
from starlette.requests import Request
from starlette.responses import Response

from chatstream_asgi.asgi.conversation_apis import ApiOptions, append_apis, handle_api
from chatstream_asgi.asgi.exchange import EXCHANGE_KEY, ChatExchange
from chatstream_asgi.asgi.standalone import FallbackSessions, handle_without_middleware
from chatstream_asgi.asgi.streaming import (
    CLIENT_DISCONNECTED_BEFORE_STREAMING,
    MESSAGE_ID_HEADER,
    STREAM_HEADERS,
    ChatTurnResponse,
    OutcomeCallback,
    report_outcome,
    wait_for_slot,
)
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.asgi.waiting import WaitingResponse, client_identity, queue_deadline
from chatstream_asgi.asgi.wire import CHATSTREAM_EOS, STREAM_FORMATS, StreamFormat, choose_format, encoder_for
from chatstream_asgi.compat.app_setup import append_middlewares
from chatstream_asgi.compat.defaults import DEFAULT, resolve_defaults
from chatstream_asgi.compat.roles import ClientRoles, grant, refusal
from chatstream_asgi.core.params import GenerationParams, parse_chat_request
from chatstream_asgi.core.prompt import AbstractChatPrompt, ChatPrompt
from chatstream_asgi.engine.base import Engine
from chatstream_asgi.engine.batching import BatchingEngine, supports_batching
from chatstream_asgi.engine.mock import mock_engine
from chatstream_asgi.engine.transformers_engine import TransformersEngine
from chatstream_asgi.errors import (
    ChatStreamError,
    InvalidParameter,
    InvalidRequest,
    NothingToRegenerate,
    SessionBusy,
    error_body,
    error_response,
)
from chatstream_asgi.frontends.console import ConsoleConversation
from chatstream_asgi.runtime.admission import ADMISSION_POLICIES, Admission, AdmissionPolicy, ReplicaAffinity, Slot
from chatstream_asgi.sessions.session import CHAT_PROMPT_KEY, GENERATION_PARAMS_KEY, TurnSession

logger = logging.getLogger(__name__)

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

# nginx's code for "client closed request": the answer nobody receives after a client left the queue.
_CLIENT_CLOSED_REQUEST = 499


class ChatStream:
    """Streams chat replies from a model, with admission, sessions and outcome callbacks.

    Pass a Hugging Face `model` and `tokenizer` (as with ChatStream), or a ready `engine`.
    `devices=["cuda:0", "cuda:1"]` (or ChatStream's `num_gpus=2`) runs one replica of the model
    per device, each its own copy; `num_of_concurrent_executions` then counts per replica.
    A local model runs on the `BatchingEngine` (concurrent chats share forward passes) when it
    can; `batching=False` picks `TransformersEngine` (one `model.generate` per slot) instead.
    `conversation_cache_bytes` and `prefill_chunk_tokens` tune the batching engine (see it).
    `max_queue_wait` (seconds) bounds a request's wait for a slot: past it, 503 `queue_timeout`.
    `admission="fair"` takes turns between clients (API keys, else addresses; `X-Forwarded-For`
    only with `trust_forwarded=True`) instead of serving waiters in arrival order.
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
        max_queue_wait: float | None = None,
        admission: AdmissionPolicy = "fifo",
        trust_forwarded: bool = False,
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
        name, too_many_request_as_http_error, context_len = (
            chosen["name"],
            chosen["too_many_request_as_http_error"],
            chosen["context_len"],
        )
        temperature, top_k, top_p, seed = chosen["temperature"], chosen["top_k"], chosen["top_p"], chosen["seed"]
        stream_format = chosen["stream_format"]
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
        if stream_format not in STREAM_FORMATS:
            raise ValueError(f"stream_format must be one of {', '.join(STREAM_FORMATS)}, not {stream_format!r}")
        if admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_POLICIES)}, not {admission!r}")
        if max_queue_wait is not None and not max_queue_wait > 0:
            raise ValueError(f"max_queue_wait must be positive seconds or None, not {max_queue_wait!r}")
        if context_len <= max_new_tokens:
            raise ValueError(
                f"context_len ({context_len}) must be larger than max_new_tokens ({max_new_tokens}): "
                "the prompt gets what is left"
            )
        try:
            # ChatStream's None means "off" for these knobs.
            self.params = GenerationParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k or 0,
                top_p=1.0 if top_p is None else top_p,
                repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                stop=tuple(stop or ()),
            )
        except InvalidParameter as error:  # a configuration mistake, not a client's
            raise ValueError(f"ChatStream(): {error.detail}") from None
        if devices is None and num_gpus:  # ChatStream's way to ask for one replica per GPU
            devices = [f"cuda:{index}" for index in range(num_gpus)]
        if use_mock_response and engine is None:
            engine = mock_engine(chosen["mock_params"])
        if engine is not None:
            if devices is not None:
                raise ValueError("devices= (or num_gpus=) places a local model; a ready engine= runs where it is")
            self.engines: list[Engine] = [engine]
        else:
            if model is None or tokenizer is None:
                raise ValueError("ChatStream needs model= and tokenizer= (or a ready engine=)")
            if chat_prompt_clazz is None and not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "the tokenizer has no chat template: pass chat_prompt_clazz= with a prompt class "
                    "(a subclass of chatstream_asgi.AbstractChatPrompt) that renders this model's format"
                )
            places: list[str | None] = list(devices) if devices else [device]
            if batching is None:
                batching = supports_batching(model)
            elif batching and not supports_batching(model):
                raise ValueError(f"{type(model).__name__} cannot use the batching engine; pass batching=False")
            self.engines = _local_replicas(
                model,
                tokenizer,
                places,
                num_of_concurrent_executions,
                batching=batching,
                conversation_cache_bytes=conversation_cache_bytes,
                prefill_chunk_tokens=prefill_chunk_tokens,
            )
        if seed is not None:
            transformers.set_seed(seed)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(self.engine, "tokenizer", None)
        self.chat_prompt_clazz: type[AbstractChatPrompt] = chat_prompt_clazz or ChatPrompt
        self.context_len = context_len
        self.stream_format: StreamFormat = stream_format
        self.too_many_request_as_http_error = too_many_request_as_http_error
        self.name = name or _model_name(self.engine)
        #: Seconds a request may wait for a slot before 503 `queue_timeout` (None: as long as it takes).
        self.max_queue_wait = max_queue_wait
        #: Whether the client address for fair turns may come from `X-Forwarded-For` (a proxy in front).
        self.trust_forwarded = trust_forwarded
        self.admission = Admission(
            num_of_concurrent_executions, max_queue_size, replicas=len(self.engines), policy=admission
        )
        self._replicas = ReplicaAffinity(len(self.engines))  # a conversation's turns go where its cache is
        #: ChatStream's `client_roles` dict as given (None: every mounted API is open), and its rules.
        self.client_roles: dict[str, Any] | None = chosen["client_roles"]
        self.roles = ClientRoles(self.client_roles) if self.client_roles is not None else None
        self._console: ConsoleConversation | None = None  # handle_console_input's conversation
        #: Sessions for requests that reach the handler with none attached (no middleware in front).
        self.fallback_sessions = FallbackSessions()

    @property
    def engine(self) -> Engine:
        """The engine (the first replica's, when there are several)."""
        return self.engines[0]

    @property
    def ready(self) -> bool:
        """True once every replica can generate (`/ready`)."""
        return all(engine.ready for engine in self.engines)

    async def check_ready(self) -> bool:
        """`ready`, and for engines that generate elsewhere, whether that server answers now."""
        for engine in self.engines:
            answers = getattr(engine, "answers", None)
            if not engine.ready or (answers is not None and not await answers()):
                return False
        return True

    def load(self) -> dict[str, int]:
        """Generations running and waiting, and the limits."""
        return self.admission.load().as_dict()

    async def start_queue_worker(self) -> None:
        """Accepted for ChatStream compatibility; admission needs no worker task here."""

    def create_chat_prompt(self) -> AbstractChatPrompt:
        """A new, empty conversation of this server's prompt class."""
        prompt = self.chat_prompt_clazz()
        prompt.set_tokenizer(self.tokenizer)
        prompt.build_initial_prompt(prompt)
        return prompt

    def prompt_from_dict(self, data: dict[str, Any]) -> AbstractChatPrompt:
        """A conversation restored from its `to_dict()` form (as stored in a session)."""
        prompt = self.chat_prompt_clazz.from_dict(data)
        prompt.set_tokenizer(self.tokenizer)
        return prompt

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | str | None = None, callback: OutcomeCallback | None = None
    ) -> Response:
        """Answer one `POST /chat_stream`: an error, or the streamed reply once a slot is free.

        `request_body` is optional behind `ChatStreamMiddleware`, which replays the body.
        Without the middleware (any path, any app) the handler reads the body, finds the
        session and watches the client itself (`standalone`).
        `callback(request, outcome)` is called exactly once if the request reached admission.
        """
        exchange = request.scope.get(EXCHANGE_KEY)
        if not isinstance(exchange, ChatExchange):
            return await handle_without_middleware(self, request, request_body, callback)
        session = exchange.session
        denied = refusal(self.roles, request, session.get_session(), "chat_stream")
        if denied is not None:
            return denied
        try:
            stream_format = choose_format(request.scope, self.stream_format)
            if stream_format is None:
                raise InvalidRequest(f"'format' must be one of {', '.join(STREAM_FORMATS)}")
            turn = parse_chat_request(exchange.body if request_body is None else request_body)
            promoted = self.roles.promotion(turn.user_input) if self.roles is not None else None
            if promoted is not None:  # a pass phrase: answered here, never shown to the model
                return await grant(session, promoted, stream_format)
            max_wait = queue_deadline(request.scope, self.max_queue_wait)
            limit = self.params.max_new_tokens
            self.params.with_overrides(turn.overrides, max_new_tokens_limit=limit)  # refuse bad input before locking
            self.admission.check_room()  # and overload: a 429 costs no round trip to a shared store
            if not await session.lock_turn():
                raise SessionBusy("a turn of this conversation is still running; wait for it or stop it first")
            try:
                if not session.is_new:  # another replica may have finished a turn since the session was read
                    await session.reload()
                stored = dict(session.get_session().get(GENERATION_PARAMS_KEY, {}))
                if "max_new_tokens" in stored:  # the server's limit may have dropped since it was set
                    stored["max_new_tokens"] = min(stored["max_new_tokens"], limit)
                params = self.params.with_overrides({**stored, **turn.overrides}, max_new_tokens_limit=limit)
                prompt = self._session_prompt(session)
                if turn.regenerate and not prompt.has_reply_to_regenerate():
                    raise NothingToRegenerate("there is no reply to regenerate in this conversation yet")
                conversation = None if session.is_new else session.session_id
                ticket = self.admission.enter(
                    client_identity(request.scope, self.trust_forwarded),
                    max_wait,
                    prefer=self._replicas.last(conversation),
                )
                # A waiting SSE client gets its 200 now and queue frames; other formats wait silently.
                queued = ticket.slot is None and stream_format == "sse"
                slot = None if queued else await wait_for_slot(ticket, request, exchange, callback)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await session.unlock_turn()
                raise
        except ChatStreamError as error:
            return self._refusal(request, error)
        encoder = encoder_for(stream_format)
        message_id = str(uuid.uuid4())

        def start_turn(slot: Slot) -> ChatTurnResponse:
            self._replicas.ran(session.session_id, slot.replica)
            return ChatTurnResponse(
                request=request,
                exchange=exchange,
                slot=slot,
                engine=self.engines[slot.replica],
                prompt=prompt,
                user_input=turn.user_input,
                regenerate=turn.regenerate,
                params=params,
                context_len=self.context_len,
                encoder=encoder,
                callback=callback,
                message_id=message_id,
            )

        if queued:
            return WaitingResponse(
                request=request,
                exchange=exchange,
                ticket=ticket,
                callback=callback,
                media_type=encoder.media_type,
                headers={MESSAGE_ID_HEADER: message_id, **STREAM_HEADERS},
                queue_frame=encoder.queue,
                error_frame=lambda error: encoder.error(error_body(error)),
                start=start_turn,
                release=session.unlock_turn,
            )
        if slot is None:
            await session.unlock_turn()
            await report_outcome(callback, request, CLIENT_DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=_CLIENT_CLOSED_REQUEST)
        return start_turn(slot)

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
            self._console = ConsoleConversation(self)
        reply = ""
        async for text in self._console.reply(user_input):
            pos = "mid" if reply else "begin"
            reply += text
            yield reply + CHATSTREAM_EOS, text, pos

    # ChatStream's per-API handlers, for endpoints written against them.

    async def handle_clear_context_request(self, request: Request) -> Response:
        """`POST /clear_context`: forget this session's conversation."""
        return await handle_api(self, "clear_context", request, {})

    async def handle_get_prompt_request(self, request: Request) -> Response:
        """`GET /get_prompt`: the current prompt text (URL-quoted, as ChatStream sends it)."""
        return await handle_api(self, "get_prompt", request, {})

    async def handle_set_generation_params_request(self, request: Request) -> Response:
        """`POST /set_generation_params`: this session's sampling parameters."""
        return await handle_api(self, "set_generation_params", request, {})

    async def handle_get_generation_params_request(self, request: Request) -> Response:
        """`GET /get_generation_params`: the parameters this session's next turn uses."""
        return await handle_api(self, "get_generation_params", request, {})

    async def handle_set_feedback_request(self, request: Request, opts: ApiOptions | None = None) -> Response:
        """`POST /set_feedback`: hand a like/dislike on a message to `opts["on_feedback_received"]`."""
        return await handle_api(self, "set_feedback", request, opts or {})

    async def handle_get_load_request(self, request: Request) -> Response:
        """`GET /get_load`: generations running and waiting."""
        return await handle_api(self, "get_load", request, {})

    async def handle_get_resource_usage_request(self, request: Request) -> Response:
        """`GET /get_resource_usage`: process and GPU memory."""
        return await handle_api(self, "get_resource_usage", request, {})

    def close(self) -> None:
        """Stop the engines' threads: they finish what they run first, and this waits for them
        (bounded), so call it off the event loop (`anyio.to_thread.run_sync(chat_stream.close)`)."""
        for engine in self.engines:
            engine.close()

    def _session_prompt(self, session: TurnSession) -> AbstractChatPrompt:
        data = session.get_session()
        prompt = data.get(CHAT_PROMPT_KEY)
        if not isinstance(prompt, AbstractChatPrompt):
            prompt = data[CHAT_PROMPT_KEY] = self.create_chat_prompt()
        return prompt

    def refusal_status(self, error: ChatStreamError) -> int:
        """The HTTP status of a refusal: its own, except ChatStream's 200 for a full queue when
        `too_many_request_as_http_error=False`."""
        if error.status_code == 429 and not self.too_many_request_as_http_error:
            return 200
        return error.status_code

    def _refusal(self, request: Request, error: ChatStreamError) -> Response:
        telemetry_of(request.scope).refused(error)
        return error_response(error, status_code=self.refusal_status(error))


def _local_replicas(
    model: Any,
    tokenizer: Any,
    devices: list[str | None],
    concurrency: int,
    *,
    batching: bool,
    conversation_cache_bytes: int | None,
    prefill_chunk_tokens: int | None,
) -> list[Engine]:
    """One engine per device (`BatchingEngine`, or `TransformersEngine` without batching), each
    with a model object of its own.

    The first replica is the caller's model; each other one is loaded again from where the
    caller's came from (`from_pretrained(model.name_or_path)`, same dtype), straight onto its
    device. A model built in memory, with nowhere to load from, is deep-copied instead.
    """
    models = [model] + [_load_again(model) for _ in devices[1:]]
    if batching:
        return [
            BatchingEngine(
                replica,
                tokenizer,
                device=device,
                max_batch_size=concurrency,
                conversation_cache_bytes=conversation_cache_bytes,
                prefill_chunk_tokens=prefill_chunk_tokens,
            )
            for replica, device in zip(models, devices, strict=True)
        ]
    return [
        TransformersEngine(replica, tokenizer, device=device, workers=concurrency)
        for replica, device in zip(models, devices, strict=True)
    ]


def _load_again(model: Any) -> Any:
    source = getattr(model, "name_or_path", "")
    if source and Path(source).is_dir():
        return type(model).from_pretrained(source, dtype=model.dtype)
    return copy.deepcopy(model)


def _model_name(engine: Engine) -> str:
    source = getattr(engine, "name_or_path", "")
    return Path(source).name if source else "chatstream"
