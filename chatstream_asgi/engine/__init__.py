"""Token generators behind one small protocol (`Engine`, `Generation`): `BatchingEngine` (a
local model, concurrent chats batched), `TransformersEngine` (a local model, one `generate` per
slot), `OpenAIEngine` (a remote OpenAI-compatible server) and `MockEngine` (no model at all)."""

from chatstream_asgi.engine.base import Engine, Generation, GenerationFailed, GenerationStats
from chatstream_asgi.engine.batch import supports_batching
from chatstream_asgi.engine.batching import BatchingEngine
from chatstream_asgi.engine.local import resolve_device
from chatstream_asgi.engine.mock import MockEngine
from chatstream_asgi.engine.openai_engine import OpenAIEngine
from chatstream_asgi.engine.transformers_engine import TransformersEngine

__all__ = [
    "BatchingEngine",
    "Engine",
    "Generation",
    "GenerationFailed",
    "GenerationStats",
    "MockEngine",
    "OpenAIEngine",
    "TransformersEngine",
    "resolve_device",
    "supports_batching",
]
