"""Token generators behind one small protocol (`Engine`, `Generation`)."""

from chatstream_asgi.engine.base import Engine, Generation, GenerationFailed, GenerationStats
from chatstream_asgi.engine.transformers_engine import TransformersEngine, resolve_device

__all__ = ["Engine", "Generation", "GenerationFailed", "GenerationStats", "TransformersEngine", "resolve_device"]
