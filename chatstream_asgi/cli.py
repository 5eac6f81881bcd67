"""`chatstream-asgi serve`: a chat server in one command, for trying the package or running it plainly.

Before torch loads, the command shortens OpenMP's spin-wait (`GOMP_SPINCOUNT`, unless already set):
torch's CPU threads otherwise keep spinning on every core between operations, and the event loop
waits for a core: `python -m bench` measured `/health` p99 under load at about 9x idle with the
default and about 1.4x with this setting, at the same tokens/s. Once the model is loaded it also
freezes the garbage collector's view of everything loaded so far (`gc.freeze()`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatstream_asgi.middleware import ChatStreamMiddleware

#: OpenMP spin-wait for a server process (see the module docstring); a user's own setting wins.
SERVER_OPENMP_SETTINGS = {"GOMP_SPINCOUNT": "20000", "KMP_BLOCKTIME": "1"}

logger = logging.getLogger("chatstream_asgi.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `chatstream-asgi` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name, value in SERVER_OPENMP_SETTINGS.items():
        os.environ.setdefault(name, value)
    if args.command != "serve":
        parser.print_help()
        return 2
    return _serve(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatstream-asgi", description="Streaming chat server for language models.")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve /chat_stream, /health, /ready, the conversation APIs and /v1")
    serve.add_argument(
        "--model",
        help="folder saved with save_pretrained, a hub id (needs a reachable hub), or 'mock' (echoes, "
        "no model); default: a tiny random-weight demo model built offline",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    serve.add_argument("--concurrency", type=_positive, default=2, help="generations at once (default: %(default)s)")
    serve.add_argument("--queue", type=_non_negative, default=5, help="requests that may wait (default: %(default)s)")
    serve.add_argument(
        "--max-new-tokens", type=_positive, default=256, help="reply length limit (default: %(default)s)"
    )
    serve.add_argument(
        "--context-len", type=_positive, default=2048, help="prompt + reply tokens (default: %(default)s)"
    )
    serve.add_argument(
        "--session-store",
        default="memory",
        type=_session_store_option,
        help="memory, or redis://host:port/db to share conversations between replicas "
        "(needs --secret-key or $CHATSTREAM_SECRET_KEY; default: %(default)s)",
    )
    serve.add_argument("--secret-key", help="signs session cookies (default: $CHATSTREAM_SECRET_KEY, else random)")
    serve.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="require Authorization: Bearer KEY on every route but /health and /ready (repeatable)",
    )
    serve.add_argument("--no-openai", action="store_true", help="do not serve /v1/chat/completions and /v1/models")
    serve.add_argument("--no-webui", action="store_true", help="do not serve the chat page at /")
    return parser


def build_app(args: argparse.Namespace) -> tuple[ChatStreamMiddleware, str]:
    """The ASGI app `serve` runs, and a line saying which model it serves."""
    from starlette.applications import Starlette
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatstream_asgi.chat_stream import ChatStream
    from chatstream_asgi.demo_model import ensure_demo_model
    from chatstream_asgi.engine.mock import MockEngine
    from chatstream_asgi.middleware import ChatStreamMiddleware, check_shared_key
    from chatstream_asgi.redis_store import RedisStore
    from chatstream_asgi.session import MemoryStore

    # Checked before a model is loaded: a refusal should cost nothing.
    store = RedisStore(args.session_store) if args.session_store != "memory" else MemoryStore()
    check_shared_key(store, args.secret_key)
    limits = {
        "num_of_concurrent_executions": args.concurrency,
        "max_queue_size": args.queue,
        "max_new_tokens": args.max_new_tokens,
        "context_len": args.context_len,
    }
    if args.model == "mock":
        chat_stream = ChatStream(engine=MockEngine(), **limits)
        source = "the mock engine (no model: it echoes what you say)"
    else:
        if args.model is None:
            path: Path | str = ensure_demo_model()
            source = f"the built-in demo model (random weights, built offline at {path}): replies are gibberish"
        else:
            path = Path(args.model) if Path(args.model).exists() else args.model
            source = f"model {args.model}"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        chat_stream = ChatStream(model=model, tokenizer=tokenizer, device=args.device, **limits)
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=chat_stream,
        serve=True,
        health=True,
        session_store=store,
        secret_key=args.secret_key,
        apis={"exclude": ["get_prompt"]},  # get_prompt exposes conversations: opt in from code
        openai=not args.no_openai,
        api_keys=args.api_keys,
        webui=_webui_on(args),
    )
    return app, source


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    try:
        app, source = build_app(args)
    except (OSError, ValueError) as error:
        print(f"chatstream-asgi: cannot start: {error}", file=sys.stderr)
        return 1
    # What is loaded now (libraries, model) lives as long as the process: freezing it keeps the
    # garbage collector from re-scanning it, which otherwise stalls every thread, the event
    # loop included, for milliseconds at a time under load.
    gc.freeze()
    base = f"http://{args.host}:{args.port}"
    print(f"chatstream-asgi serving {source}", flush=True)
    if _webui_on(args):
        print(f"  chat page: {base}/   (open it in a browser)", flush=True)
    elif not args.no_webui:
        print("  chat page: off (with --api-key, a browser cannot send the key)", flush=True)
    print(f'  chat:   curl -N {base}/chat_stream -d \'{{"user_input": "Hello"}}\'', flush=True)
    print(f"  health: {base}/health   ready: {base}/ready", flush=True)
    print(f"  conversation APIs: {base}/clear_context, /get_generation_params, /get_load, ...", flush=True)
    if not args.no_openai:
        print(f"  OpenAI API: {base}/v1/chat/completions (model {app.chat_stream.name!r})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _webui_on(args: argparse.Namespace) -> bool:
    """The page is on unless --no-webui, or --api-key (a browser has no way to send the key)."""
    return not args.no_webui and not args.api_keys


def _session_store_option(text: str) -> str:
    if text != "memory" and not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"expected memory or a redis:// URL, not {text!r}")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
