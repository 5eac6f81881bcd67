"""The server under benchmark: serve mode plus a route that reports each chat's figures.

Started by the harness as `uvicorn bench.app:app` in its own process, configured by environment
variables, so the client's work never shares a GIL or an event loop with the server's.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware

_model_path = os.environ["BENCH_MODEL"]
_finished: list[dict[str, Any]] = []
_cache_bytes = int(os.environ.get("BENCH_CONVERSATION_CACHE_BYTES", "-1"))
_prefill_chunk = int(os.environ.get("BENCH_PREFILL_CHUNK_TOKENS", "0"))
_lookup = int(os.environ.get("BENCH_PROMPT_LOOKUP", "-1"))

chat_stream = ChatStream(
    model=AutoModelForCausalLM.from_pretrained(_model_path),
    tokenizer=AutoTokenizer.from_pretrained(_model_path),
    device=os.environ.get("BENCH_DEVICE", "auto"),
    num_of_concurrent_executions=int(os.environ.get("BENCH_CONCURRENCY", "2")),
    max_queue_size=int(os.environ.get("BENCH_QUEUE", "5")),
    max_new_tokens=int(os.environ.get("BENCH_MAX_NEW_TOKENS", "256")),
    context_len=int(os.environ.get("BENCH_CONTEXT_LEN", "4096")),
    temperature=0,
    # -1 (the default): sized from free memory, as ChatStream does unless told.
    conversation_cache_bytes=None if _cache_bytes < 0 else _cache_bytes,
    # 0 (the default): chunks sized to cost about 1.5 decode steps, as ChatStream does unless told.
    prefill_chunk_tokens=_prefill_chunk or None,
    # -1 (the default): prompt lookup as ChatStream does unless told; 0: off.
    prompt_lookup_num_tokens=None if _lookup < 0 else _lookup,
)


def _record(request: Request, outcome: str) -> None:
    stats = getattr(request.state, "chat_generation", None)
    _finished.append({"outcome": outcome, **(vars(stats) if stats is not None else {})})


async def finished(request: Request) -> JSONResponse:
    return JSONResponse(_finished)


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def prefill_chunk(request: Request) -> JSONResponse:
    """The tokens the batching engine would prefill of a prompt joining one running chat now."""
    chunks = getattr(chat_stream.engine, "chunks", None)
    return JSONResponse({"tokens": chunks.budget(running=1, waiting=[1000]) if chunks is not None else None})


app = ChatStreamMiddleware(
    Starlette(
        routes=[
            Route("/bench/finished", finished),
            Route("/bench/ping", ping),
            Route("/bench/prefill-chunk", prefill_chunk),
        ]
    ),
    chat_stream=chat_stream,
    serve=True,
    health=True,
    openai=True,
    callback=_record,
)

# As `chatstream-asgi serve` does: the model and libraries loaded so far are permanent, so the
# collector stops re-scanning them (a full collection otherwise stalls every thread for ms).
gc.freeze()
