"""`ChatService`: what every front-end runs a chat turn through, whatever speaks to the client.

It owns the engines (one per model replica), the admission that shares their slots out, the
server's generation parameters and the prompt class. A turn asks it for a ticket
(`enter`), and once a slot is granted runs the generation on that slot's replica (`generate`);
the HTTP endpoints, the console and the ChatStream facade all do it this way, so none of them
knows how replicas, the conversation cache's affinity or the queue work. It knows nothing of
HTTP, sessions or ChatStream: the facade (`compat.chat_stream`) and the CLI build one and hand
it to the endpoints.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt, ChatPrompt
from chatstream_asgi.engine.base import Engine, Generation
from chatstream_asgi.engine.batch import supports_batching
from chatstream_asgi.runtime.admission import ADMISSION_POLICIES, Admission, AdmissionPolicy, Slot, Ticket
from chatstream_asgi.runtime.replicas import ReplicaAffinity, local_replicas, model_name


class ChatService:
    """Engines, admission, parameters and the prompt class of one server (see the module docstring).

    Pass a Hugging Face `model` and `tokenizer`, or a ready `engine`. `devices=["cuda:0",
    "cuda:1"]` runs one replica of the model per device; `concurrency` then counts per replica.
    A local model runs on the `BatchingEngine` when it can; `batching=False` picks
    `TransformersEngine` (one `model.generate` per slot). `max_queue_wait` (seconds) bounds a
    wait for a slot; `admission="fair"` takes turns between clients. The batching engine's
    conversation cache is partitioned by tenant (`generate`'s params carry the partition);
    `cache_shared_system_prompt` declares a system text whose rendered beginning all may share.
    """

    def __init__(
        self,
        *,
        params: GenerationParams,
        model: Any = None,
        tokenizer: Any = None,
        engine: Engine | None = None,
        device: str | None = "auto",
        devices: list[str] | None = None,
        concurrency: int = 2,
        max_queue_size: int = 5,
        prompt_class: type[AbstractChatPrompt] | None = None,
        context_len: int = 2048,
        name: str | None = None,
        batching: bool | None = None,
        conversation_cache_bytes: int | None = None,
        prefill_chunk_tokens: int | None = None,
        prompt_lookup_num_tokens: int | None = None,
        cache_shared_system_prompt: str | None = None,
        max_queue_wait: float | None = None,
        admission: AdmissionPolicy = "fifo",
        trust_forwarded: bool = False,
    ) -> None:
        check_service_options(
            admission=admission,
            max_queue_wait=max_queue_wait,
            context_len=context_len,
            max_new_tokens=params.max_new_tokens,
        )
        self.engines: list[Engine] = _engines(
            model,
            tokenizer,
            engine,
            device=device,
            devices=devices,
            concurrency=concurrency,
            prompt_class=prompt_class,
            batching=batching,
            conversation_cache_bytes=conversation_cache_bytes,
            prefill_chunk_tokens=prefill_chunk_tokens,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens,
            cache_shared_system_prompt=cache_shared_system_prompt,
        )
        self.params = params
        self.tokenizer = tokenizer if tokenizer is not None else getattr(self.engine, "tokenizer", None)
        self.prompt_class: type[AbstractChatPrompt] = prompt_class or ChatPrompt
        self.context_len = context_len
        self.name = name or model_name(self.engine)
        #: Seconds a request may wait for a slot before 503 `queue_timeout` (None: as long as it takes).
        self.max_queue_wait = max_queue_wait
        #: Whether the client address for fair turns may come from `X-Forwarded-For` (a proxy in front).
        self.trust_forwarded = trust_forwarded
        self.admission = Admission(concurrency, max_queue_size, replicas=len(self.engines), policy=admission)
        self._replicas = ReplicaAffinity(len(self.engines))  # a conversation's turns go where its cache is

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
        return await self.readiness() == "ready"

    async def readiness(self) -> str:
        """`"ready"`, `"loading"` (a model is not loaded yet) or `"upstream_unavailable"` (an
        engine that generates elsewhere does not answer now)."""
        for engine in self.engines:
            if not engine.ready:
                return "loading"
            answers = getattr(engine, "answers", None)
            if answers is not None and not await answers():
                return "upstream_unavailable"
        return "ready"

    def load(self) -> dict[str, int]:
        """Generations running and waiting, and the limits."""
        return self.admission.load().as_dict()

    def create_chat_prompt(self) -> AbstractChatPrompt:
        """A new, empty conversation of this server's prompt class."""
        prompt = self.prompt_class()
        prompt.set_tokenizer(self.tokenizer)
        prompt.build_initial_prompt(prompt)
        return prompt

    def prompt_from_dict(self, data: dict[str, Any]) -> AbstractChatPrompt:
        """A conversation restored from its `to_dict()` form (as stored in a session)."""
        prompt = self.prompt_class.from_dict(data)
        prompt.set_tokenizer(self.tokenizer)
        return prompt

    def enter(self, client: Hashable, max_wait: float | None, conversation: str | None = None) -> Ticket:
        """A place in admission for one turn (a slot at once, or a wait); raises 429 when full.

        `conversation` names the chat, so its turn prefers the replica that ran its last one.
        """
        return self.admission.enter(client, max_wait, prefer=self._replicas.last(conversation))

    def generate(
        self, slot: Slot, prompt: AbstractChatPrompt, params: GenerationParams, conversation: str | None = None
    ) -> AbstractAsyncContextManager[Generation]:
        """Run one generation on the replica that granted `slot`."""
        if conversation is not None:
            self._replicas.ran(conversation, slot.replica)
        return self.engines[slot.replica].generate(prompt, params, context_len=self.context_len)

    def close(self) -> None:
        """Stop the engines' threads: they finish what they run first, and this waits for them
        (bounded), so call it off the event loop (`anyio.to_thread.run_sync(service.close)`)."""
        for engine in self.engines:
            engine.close()


def check_service_options(
    *, admission: str, max_queue_wait: float | None, context_len: int, max_new_tokens: int
) -> None:
    """Refuse options that are wrong whatever the model, before any model is placed."""
    if admission not in ADMISSION_POLICIES:
        raise ValueError(f"admission must be one of {', '.join(ADMISSION_POLICIES)}, not {admission!r}")
    if max_queue_wait is not None and not max_queue_wait > 0:
        raise ValueError(f"max_queue_wait must be positive seconds or None, not {max_queue_wait!r}")
    if context_len <= max_new_tokens:
        raise ValueError(
            f"context_len ({context_len}) must be larger than max_new_tokens ({max_new_tokens}): "
            "the prompt gets what is left"
        )


def check_model_arguments(
    model: Any,
    tokenizer: Any,
    engine: Engine | None,
    devices: Sequence[str] | None,
    prompt_class: type[AbstractChatPrompt] | None,
    *,
    owner: str = "a ChatService",
    prompt_option: str = "prompt_class=",
    devices_option: str = "devices=",
) -> None:
    """Refuse a model that cannot be served, before it is placed; the messages name the caller's
    own arguments (`ChatStream` says `chat_prompt_clazz=`, a `ChatService` `prompt_class=`)."""
    if engine is not None:
        if devices is not None:
            raise ValueError(f"{devices_option} places a local model; a ready engine= runs where it is")
        return
    if model is None or tokenizer is None:
        raise ValueError(f"{owner} needs model= and tokenizer= (or a ready engine=)")
    if prompt_class is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer has no chat template: pass {prompt_option} with a prompt class "
            "(a subclass of chatstream_asgi.AbstractChatPrompt) that renders this model's format"
        )


def _engines(
    model: Any,
    tokenizer: Any,
    engine: Engine | None,
    *,
    device: str | None,
    devices: Sequence[str] | None,
    concurrency: int,
    prompt_class: type[AbstractChatPrompt] | None,
    batching: bool | None,
    conversation_cache_bytes: int | None,
    prefill_chunk_tokens: int | None,
    prompt_lookup_num_tokens: int | None,
    cache_shared_system_prompt: str | None,
) -> list[Engine]:
    """The engines a service runs: the one given, or a local replica of `model` per device."""
    check_model_arguments(model, tokenizer, engine, devices, prompt_class)
    if engine is not None:
        return [engine]
    places: list[str | None] = list(devices) if devices else [device]
    if batching is None:
        batching = supports_batching(model)
    elif batching and not supports_batching(model):
        raise ValueError(f"{type(model).__name__} cannot use the batching engine; pass batching=False")
    return local_replicas(
        model,
        tokenizer,
        places,
        concurrency,
        batching=batching,
        conversation_cache_bytes=conversation_cache_bytes,
        prefill_chunk_tokens=prefill_chunk_tokens,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        cache_shared_system_prompt=cache_shared_system_prompt,
    )
