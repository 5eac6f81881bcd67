"""Model replicas: one engine per device, and which replica a conversation's next turn prefers.

A local model runs one replica per device, each with a model object of its own; admission
spreads turns over them (least loaded), except that a conversation's next turn goes back to the
replica whose conversation cache holds it when that replica has a free slot.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Any

from chatstream_asgi.engine.base import Engine
from chatstream_asgi.engine.batching import DEFAULT_LOOKUP_TOKENS, BatchingEngine
from chatstream_asgi.engine.transformers_engine import TransformersEngine


class ReplicaAffinity:
    """The replica each conversation last ran on, so its next turn can go where its key/value
    cache is kept. Bounded (least recently run out first): a forgotten conversation just goes to
    the least-loaded replica, as a new one does."""

    def __init__(self, replicas: int, capacity: int = 65536) -> None:
        self._replicas = replicas
        self._capacity = capacity
        self._last: OrderedDict[str, int] = OrderedDict()

    def last(self, conversation: str | None) -> int | None:
        """The replica `conversation` last ran on; None when unknown or with a single replica."""
        if conversation is None or self._replicas < 2:
            return None
        return self._last.get(conversation)

    def ran(self, conversation: str, replica: int) -> None:
        """`conversation` has a turn running on `replica`."""
        if self._replicas < 2:
            return
        self._last[conversation] = replica
        self._last.move_to_end(conversation)
        if len(self._last) > self._capacity:
            self._last.popitem(last=False)


def local_replicas(
    model: Any,
    tokenizer: Any,
    devices: list[str | None],
    concurrency: int,
    *,
    batching: bool,
    conversation_cache_bytes: int | None,
    prefill_chunk_tokens: int | None,
    prompt_lookup_num_tokens: int | None,
    cache_shared_system_prompt: str | None,
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
                prompt_lookup_num_tokens=(
                    DEFAULT_LOOKUP_TOKENS if prompt_lookup_num_tokens is None else prompt_lookup_num_tokens
                ),
                cache_shared_system_prompt=cache_shared_system_prompt,
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


def model_name(engine: Engine) -> str:
    """The name a model is served under by default: its folder's name."""
    source = getattr(engine, "name_or_path", "")
    return Path(source).name if source else "chatstream"
