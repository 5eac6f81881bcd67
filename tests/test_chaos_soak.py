"""Chaos soak (issue 11): 1,500 chats against a real server while everything goes wrong.

A real uvicorn server runs `ChatStream` over the batching engine (the tiny real model) with
sessions in a Redis this test starts, so it can freeze and thaw it. Client threads, more than the
slots and the queue hold, send chats that each play one part, drawn by a seeded random:

- read the whole reply (httpx, keep-alive), or read it and cut the connection right after the end;
- leave mid-stream, after a few pieces of text;
- leave while queued (an SSE client that has seen its `event: queue` frame), or while its prompt
  is in prefill, before any byte of the reply;
- send a prompt whose prefill fails, or one whose decode steps fail (injected in the model's
  forward pass), while other chats share its batch;
- continue an earlier conversation (its session in Redis).

A refused client retries (up to `ATTEMPTS` in all), so some 3,900 requests are sent. Meanwhile
the queue overflows (429s), a burst of ten times what the server holds arrives at once, and Redis
is frozen twice, then thawed (503 while frozen).
Afterwards: exactly one outcome callback per admitted chat, each the outcome its client caused;
none for a refused one; no slot, waiter, turn lock, thread or memory left behind.

Every window is decided by the client's own actions, not by timing: a chat that leaves before the
first byte carries a tag in its prompt, and the model hook holds its prefill until the server has
seen the disconnect; a chat that leaves mid-stream asks for far more text than it reads.

`CHATSTREAM_SOAK=long` runs ten times as many chats (the manual profile), `CHATSTREAM_SOAK_CHATS=N`
any number, and `CHATSTREAM_SOAK_SEED` another seed:
    CHATSTREAM_SOAK=long python -m pytest -s tests/test_chaos_soak.py
`-s` shows the figures it prints (chats, outcomes by kind, 429s and their latency, RSS).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import random
import re
import selectors
import socket
import statistics
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from chatstream_asgi import ChatStream, ChatStreamMiddleware, RedisStore

from .conftest import HANG_GUARD, LiveServer, RedisServer, wait_until

LONG = os.environ.get("CHATSTREAM_SOAK") == "long"
CHATS = int(os.environ.get("CHATSTREAM_SOAK_CHATS", 15000 if LONG else 1500))
SEED = int(os.environ.get("CHATSTREAM_SOAK_SEED", "11"))
SLOTS, QUEUE = 4, 8
CLIENTS = 16  # more than the slots and the queue together: overload is part of the run
REPLY_TOKENS = 8  # what a chat that reads its whole reply asks for
LEAVER_TOKENS = 300  # what a chat that leaves mid-stream asks for: far more than it reads
POISON_FROM = 600  # decode steps at this position or later fail; only poisoned prompts get there
PREFILL_CHUNK = 512  # past every healthy prompt; a poisoned one is prefilled in two chunks or more
# What happens when these fractions of the chats have started: Redis frozen (then thawed), or
# a burst of ten times what the server holds sent at once.
SCHEDULE = (("freeze", 0.25), ("burst", 0.5), ("freeze", 0.75))
FREEZE_SECONDS = 1.5
BURST = 10 * (SLOTS + QUEUE)
STORE_TIMEOUT = 0.5
RSS_SLACK = 64 << 20  # what RSS may grow by beyond the conversation cache: the run's own records, pools
PREFIX = "soak:"
TAG = re.compile(r"\[(\d{6}) ([a-z_]+)\]")  # [chat id part]: the plan's number and the attempt's
ATTEMPTS = 4  # a refused client tries again, up to this many times in all

# Each part a chat can play, with its weight in the draw.
PARTS = {
    "complete": 30,  # reads the whole reply
    "after_end": 12,  # reads the whole reply, then cuts the connection
    "mid_stream": 14,  # leaves after a few pieces of text
    "queued_leave": 12,  # leaves while queued (or, admitted at once, during its prefill)
    "prefill_leave": 10,  # leaves while its prompt is in prefill
    "prefill_fail": 8,  # its prefill raises
    "decode_fail": 8,  # its decode steps raise
    "follow_up": 6,  # the next turn of an earlier conversation, read whole
}
EXPECTED = {
    "complete": "success",
    "after_end": "success",
    "follow_up": "success",
    "mid_stream": "client_disconnected_while_streaming",
    "queued_leave": "client_disconnected_before_streaming",
    "prefill_leave": "client_disconnected_before_streaming",
    "prefill_fail": "unknown_error_occurred",
    "decode_fail": "unknown_error_occurred",
}
GATED = {"queued_leave", "prefill_leave"}  # their prefill waits until the server saw them leave


@dataclass
class Plan:
    """One chat, drawn before the run; each attempt at it has its own chat id (`number` + attempt)."""

    number: str
    part: str
    sse: bool
    pieces: int  # pieces of text a mid-stream leaver reads
    abrupt: bool  # whether a leaver resets the connection (RST) instead of closing it


@dataclass
class Seen:
    """What a client saw, and so the outcome it caused (None: refused, no callback)."""

    status: int
    expected: str | None
    window: str
    sent_at: float = 0.0
    latency: float = 0.0
    cookie: str | None = None


class ChaosHooks:
    """Faults and holds in the real model's forward pass, chosen by the chat a pass serves.

    A prefill pass (several tokens a row; one prompt, or prompts that arrived together, padded)
    sees the end of each prompt (the part no kept cache covers), where each chat's tag `[id part]`
    is; the soak's prefill chunks are larger than any healthy prompt, and a poisoned prompt's last
    chunk holds its whole tag. A decode step sees each row's position, and only poisoned prompts
    are long enough to reach `POISON_FROM`.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._prefill_started: dict[str, threading.Event] = {}
        self._left: dict[str, threading.Event] = {}
        self._failed_prefills: set[str] = set()  # a shared pass that fails is retried one prompt at a time
        self.decode_failures = 0
        #: Failed batched steps that also held rows of healthy chats: the retry must spare those.
        self.mixed_batch_failures = 0
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    @property
    def prefill_failures(self) -> int:
        """Chats whose prefill failed (however many passes it was tried in)."""
        return len(self._failed_prefills)

    def prefill_started(self, chat_id: str) -> threading.Event:
        with self._lock:
            return self._prefill_started.setdefault(chat_id, threading.Event())

    def left(self, chat_id: str) -> threading.Event:
        """Set once the server has received this chat's `http.disconnect`."""
        with self._lock:
            return self._left.setdefault(chat_id, threading.Event())

    def _before_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        positions = kwargs.get("position_ids")
        input_ids = kwargs["input_ids"]
        if positions is None or input_ids.shape[1] > 1:  # a prefill (decode steps come with positions)
            tags = [tag for row in input_ids for tag in TAG.findall(self._tokenizer.decode(row))]
            for chat_id, part in tags:
                if part == "prefill_fail":
                    with self._lock:
                        self._failed_prefills.add(chat_id)
                    raise RuntimeError(f"injected prefill failure of chat {chat_id}")
            for chat_id, part in tags:
                if part in GATED:
                    self.prefill_started(chat_id).set()
                    # Hold the prefill until the server knows the client left: its first token
                    # then finds the client gone, whatever the machine's speed.
                    self.left(chat_id).wait(HANG_GUARD)
            return
        poisoned = positions[:, -1] >= POISON_FROM
        if bool(poisoned.any()):
            self.decode_failures += 1
            if not bool(poisoned.all()):
                self.mixed_batch_failures += 1
            raise RuntimeError("injected decode failure")


class DisconnectProbe:
    """An ASGI layer in front of the middleware that notes when a chat's `http.disconnect`
    reaches the server (the middleware's own watcher reads it through here)."""

    def __init__(self, app: Any, hooks: ChaosHooks) -> None:
        self._app = app
        self._hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chat_id = dict(scope.get("headers", [])).get(b"x-soak-id") if scope["type"] == "http" else None
        if chat_id is None:
            await self._app(scope, receive, send)
            return
        left = self._hooks.left(chat_id.decode())

        async def noting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                left.set()
            return message

        await self._app(scope, noting_receive, send)


class RawChat:
    """One chat over a raw socket, so the client decides exactly when and how it leaves."""

    def __init__(self, url: str, chat_id: str, sse: bool, body: dict[str, Any], cookie: str | None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=HANG_GUARD)
        payload = json.dumps(body).encode()
        path = "/chat_stream?format=sse" if sse else "/chat_stream"
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            f"X-Soak-Id: {chat_id}",
            *([f"Cookie: {cookie}"] if cookie else []),
        ]
        self.sent_at = time.monotonic()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        self.data = b""
        self.status = 0
        self.head_at = 0.0
        self.set_cookie: str | None = None
        self.chunked = False
        self.body_start = 0

    def read_head(self) -> int:
        while b"\r\n\r\n" not in self.data:
            self._receive()
        self.head_at = time.monotonic()
        head, _, _ = self.data.partition(b"\r\n\r\n")
        self.body_start = len(head) + 4
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "transfer-encoding" and "chunked" in value:
                self.chunked = True
            if name.lower() == "set-cookie" and value.strip().startswith("chatstream_session="):
                self.set_cookie = value.strip().split(";")[0]
        return self.status

    def chunks(self) -> tuple[list[bytes], bool]:
        """The body's chunks so far, and whether the last one (the end) has arrived."""
        chunks, at, data = [], self.body_start, self.data
        while (line_end := data.find(b"\r\n", at)) != -1:
            size = int(data[at:line_end], 16)
            if size == 0:
                return chunks, True
            if len(data) < line_end + 2 + size + 2:
                break
            chunks.append(data[line_end + 2 : line_end + 2 + size])
            at = line_end + 2 + size + 2
        return chunks, False

    def text_pieces(self, sse: bool) -> int:
        chunks, _ = self.chunks()
        return sum(1 for chunk in chunks if (b'"delta"' in chunk if sse else chunk))

    def complete(self) -> bool:
        """Whether the whole response has arrived (the head must have been read)."""
        if self.chunked:
            return self.chunks()[1]
        head = self.data[: self.body_start].decode("latin-1").lower()  # a refusal: JSON, Content-Length
        return len(self.data) >= self.body_start + int(head.split("content-length:")[1].split("\r\n")[0])

    def read_to_end(self) -> None:
        while not self.complete():
            self._receive()

    def read_until_closed(self) -> None:
        while chunk := self.sock.recv(65536):
            self.data += chunk

    def read_more(self) -> None:
        self._receive()

    def poll(self, timeout: float) -> None:
        """Read what arrives within `timeout`, if anything."""
        self.sock.settimeout(timeout)
        try:
            self._receive()
        except TimeoutError:  # nothing new within `timeout`: the caller looks at something else
            pass
        finally:
            self.sock.settimeout(HANG_GUARD)

    def leave(self, abrupt: bool) -> None:
        if abrupt:  # a reset, as a killed browser tab sends, instead of an orderly close
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def receive_ready(self) -> None:
        """Take what a selector said is there, reading the head once it is whole."""
        self._receive()
        if not self.status and b"\r\n\r\n" in self.data:
            self.read_head()

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the server closed the connection after {self.data[-300:]!r}"
        self.data += chunk


class ChatOutcomes:
    """The outcome callback: what it was told, by the chat's `X-Soak-Id`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def __call__(self, request: Any, outcome: str) -> None:
        with self._changed:
            self.calls.append((request.headers.get("x-soak-id", ""), outcome))
            self._changed.notify_all()

    def wait_for(self, chat_id: str) -> None:
        """Wait for `chat_id`'s outcome (a hang guard)."""
        with self._changed:
            assert self._changed.wait_for(lambda: any(c == chat_id for c, _ in self.calls), HANG_GUARD), chat_id

    def wait_count(self, count: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.calls) >= count, HANG_GUARD)

    def by_chat(self) -> dict[str, list[str]]:
        with self._changed:
            found: dict[str, list[str]] = {}
            for chat_id, outcome in self.calls:
                found.setdefault(chat_id, []).append(outcome)
            return found


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss_bytes() -> int:
    """RSS once garbage is collected and glibc has handed its free pages back (`malloc_trim`):
    what is in use, not what the allocator keeps for later (a few dozen MiB after a busy run)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: compare plain RSS, with its allocator's slack
        pass
    return rss_bytes()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if (line.startswith(f"{name}{{") and wanted in line) or line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Soak:
    """The run's shared state: the plans, what each client saw, and the chaos schedule."""

    url: str
    plans: list[Plan]
    hooks: ChaosHooks
    outcomes: ChatOutcomes
    prompts: dict[str, str]
    seen: dict[str, Seen] = field(default_factory=dict)
    started: int = 0
    #: (start, end) of each Redis freeze, on the monotonic clock.
    freezes: list[tuple[float, float]] = field(default_factory=list)
    #: RSS each time another tenth of the chats has started.
    rss: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def next_plan(self) -> Plan | None:
        with self.progress:
            if self.started == len(self.plans):
                return None
            plan = self.plans[self.started]
            self.started += 1
            if self.started % max(1, len(self.plans) // 10) == 0:
                self.rss.append(rss_bytes())
            self.progress.notify_all()
            return plan

    def body(self, plan: Plan, chat_id: str) -> dict[str, Any]:
        tokens = LEAVER_TOKENS if plan.part in {"mid_stream", *GATED} else REPLY_TOKENS
        return {"user_input": f"{self.prompts[plan.number]} [{chat_id} {plan.part}]", "max_new_tokens": tokens}


def outcome_of(status: int, plan: Plan, chat_id: str) -> str | None:
    """The outcome a chat's client caused, given its answer's status (None: refused)."""
    if status in (429, 503):
        return None
    assert status == 200, f"chat {chat_id} ({plan.part}) got {status}"
    return EXPECTED[plan.part]


def run_chat(soak: Soak, plan: Plan, chat_id: str, http: httpx.Client, cookie: str | None) -> Seen:
    """Play `plan` against the server; what the client saw."""
    if plan.part in {"complete", "follow_up"}:
        params = {"format": "sse"} if plan.sse else {}
        headers = {"X-Soak-Id": chat_id, **({"Cookie": cookie} if cookie else {})}
        sent = time.monotonic()
        response = http.post("/chat_stream", params=params, json=soak.body(plan, chat_id), headers=headers)
        http.cookies.clear()  # each conversation is chosen by the plan, not by the jar
        latency = time.monotonic() - sent
        if response.status_code == 200 and plan.sse:
            assert "event: done" in response.text, response.text[-300:]
        cookie_value = response.cookies.get("chatstream_session")
        return Seen(
            response.status_code,
            outcome_of(response.status_code, plan, chat_id),
            plan.part if cookie or plan.part != "follow_up" else "complete",  # nothing to follow up yet
            sent,
            latency,
            f"chatstream_session={cookie_value}" if cookie_value else cookie,
        )
    chat = RawChat(soak.url, chat_id, plan.sse, soak.body(plan, chat_id), cookie)
    status = chat.read_head()
    latency = chat.head_at - chat.sent_at
    expected = outcome_of(status, plan, chat_id)
    window = plan.part
    if expected is None:
        chat.read_to_end()
        chat.leave(abrupt=False)
        return Seen(status, None, "refused", chat.sent_at, latency)
    if plan.part == "mid_stream":
        while chat.text_pieces(plan.sse) < plan.pieces:
            if chat.chunks()[1]:  # the reply ended first: the client never left mid-stream
                expected, window = "success", "ended_first"
                break
            chat.read_more()
    elif plan.part == "queued_leave":
        window = "prefill"
        while not soak.hooks.prefill_started(chat_id).is_set():
            if b"event: queue" in chat.data:
                window = "queued"
                break
            chat.poll(0.02)  # watching two things: the socket and the model hook
    elif plan.part == "prefill_leave":
        assert soak.hooks.prefill_started(chat_id).wait(HANG_GUARD)
    elif expected == "success" or plan.sse:  # the whole reply (SSE: a failure ends it early, in-band)
        chat.read_to_end()
        if plan.sse:
            ending = b"event: done" if expected == "success" else b"event: error"
            assert ending in chat.data, chat.data[-300:]
    else:  # a failed delta reply is cut: the server closes the connection without the body's end
        chat.read_until_closed()
        assert not chat.complete(), chat.data[-300:]
    chat.leave(plan.abrupt or plan.part == "after_end")
    return Seen(status, expected, window, chat.sent_at, latency, chat.set_cookie or cookie)


def client(soak: Soak, url: str) -> None:
    """One client thread: chats one after another, as the plans come."""
    conversation: tuple[str, str] | None = None  # (chat id, cookie) of a first turn to continue
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        while (plan := soak.next_plan()) is not None:
            cookie = None
            if plan.part == "follow_up" and conversation is not None:
                soak.outcomes.wait_for(conversation[0])  # its turn lock is released by then
                cookie = conversation[1]
            for attempt in range(ATTEMPTS):
                chat_id = f"{plan.number}{attempt}"
                seen = run_chat(soak, plan, chat_id, http, cookie)
                with soak.lock:
                    soak.seen[chat_id] = seen
                if seen.expected is not None:
                    break
                time.sleep(random.uniform(0.02, 0.1))  # a refused client backs off a little, then retries
            if seen.window == "complete" and seen.expected == "success" and seen.cookie:
                conversation = (chat_id, seen.cookie)
            elif plan.part == "follow_up":
                conversation = None  # two turns at most: prompts stay short of the poisoned length


def draw(rng: random.Random, tokenizer: Any) -> tuple[list[Plan], dict[str, str]]:
    """The run's chats and their prompts; poisoned prompts are long enough to reach `POISON_FROM`."""
    words = "sea wind story river cloud stone light garden winter road lamp song paper bridge".split()
    parts, weights = list(PARTS), list(PARTS.values())
    plans, prompts = [], {}
    for index in range(CHATS):
        number = f"{index:05d}"
        part = rng.choices(parts, weights)[0]
        text = f"chat {number}: " + " ".join(rng.choices(words, k=rng.randint(3, 8)))
        if part == "decode_fail":
            while prompt_tokens(tokenizer, text) < POISON_FROM:
                text += " " + " ".join(rng.choices(words, k=40))
        prompts[number] = text
        sse = part == "queued_leave" or rng.random() < 0.5  # a waiting SSE client sees its place
        plans.append(Plan(number, part, sse, rng.randint(1, 5), rng.random() < 0.5))
    return plans, prompts


def prompt_tokens(tokenizer: Any, user_input: str, turns: int = 1) -> int:
    """Tokens of a prompt of `turns` such messages with replies of `REPLY_TOKENS`, as the server renders it."""
    messages = []
    for _ in range(turns - 1):
        messages += [{"role": "user", "content": user_input}, {"role": "assistant", "content": "x " * REPLY_TOKENS}]
    messages.append({"role": "user", "content": user_input})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chaos(soak: Soak, redis_server: RedisServer) -> None:
    """The schedule of faults, run while the clients chat."""
    for step, fraction in SCHEDULE:
        with soak.progress:
            soak.progress.wait_for(lambda: soak.started >= fraction * len(soak.plans))  # noqa: B023
        if step == "burst":
            burst(soak)
            continue
        frozen_at = time.monotonic()
        redis_server.freeze()
        time.sleep(FREEZE_SECONDS)  # the fault's length, not a wait for anything
        redis_server.thaw()
        soak.freezes.append((frozen_at, time.monotonic()))


def burst(soak: Soak) -> None:
    """`BURST` chats sent at once, read side by side: what the server cannot hold gets 429."""
    chats = []
    with selectors.DefaultSelector() as selector:
        pending = 0

        def take_answers(timeout: float) -> None:
            nonlocal pending
            ready = selector.select(timeout)
            assert ready or not timeout, "the burst got no answer"
            for key, _ in ready:
                _, chat = key.data
                chat.receive_ready()
                if chat.status and chat.complete():
                    selector.unregister(chat.sock)
                    chat.leave(abrupt=False)
                    pending -= 1

        for number in range(BURST):
            plan = Plan(f"b{number:04d}", "complete", sse=False, pieces=0, abrupt=False)
            body = {"user_input": f"burst {number}", "max_new_tokens": REPLY_TOKENS}
            chat = RawChat(soak.url, plan.number, plan.sse, body, cookie=None)
            selector.register(chat.sock, selectors.EVENT_READ, (plan, chat))
            chats.append((plan, chat))
            pending += 1
            take_answers(0)  # answers that are in already, so each latency is its own
        while pending:
            take_answers(HANG_GUARD)
    with soak.lock:
        for plan, chat in chats:
            expected = outcome_of(chat.status, plan, plan.number)
            window = "burst" if expected else "refused"
            soak.seen[plan.number] = Seen(chat.status, expected, window, chat.sent_at, chat.head_at - chat.sent_at)


def threads_now() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.timeout(3600 if LONG else 600)
def test_chaos_soak_gives_each_admitted_chat_the_outcome_its_client_caused_and_leaks_nothing(
    model: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from chatstream_asgi.engine import BatchingEngine

    # The engine logs each injected failure with its traceback, and pytest keeps every record for
    # its report: hundreds of tracebacks, each holding a batch's tensors in its frames, would be
    # counted as the server's memory. Their outcomes say what they need to here.
    caplog.set_level(logging.CRITICAL, logger="chatstream_asgi.engine")

    rng = random.Random(SEED)
    plans, prompts = draw(rng, tokenizer)
    healthy_prompts = [f"{prompts[p.number]} [000000 {p.part}]" for p in plans if p.part != "decode_fail"]
    longest = max(prompt_tokens(tokenizer, text, turns=2) for text in healthy_prompts)
    assert longest + LEAVER_TOKENS < POISON_FROM  # only poisoned prompts ever reach a failing step
    assert longest < PREFILL_CHUNK  # no healthy prompt's tag is split between chunks

    threads_at_start = threads_now()
    redis_server = RedisServer()
    redis_server.start()
    hooks = ChaosHooks(model, tokenizer)
    # A bounded conversation cache (the default is up to 1 GiB), so that what the
    # process keeps on purpose is known and RSS can be compared.
    # Prefill chunks of a fixed size, past every healthy prompt: a chat's tag is never split
    # between two chunks, and poisoned prompts still join a chunk at a time.
    engine = BatchingEngine(
        model,
        tokenizer,
        device="cpu",
        max_batch_size=SLOTS,
        conversation_cache_bytes=16 << 20,
        prefill_chunk_tokens=PREFILL_CHUNK,
    )
    chat_stream = ChatStream(
        engine=engine, num_of_concurrent_executions=SLOTS, max_queue_size=QUEUE, max_new_tokens=LEAVER_TOKENS
    )
    assert wait_until(lambda: chat_stream.ready)
    outcomes = ChatOutcomes()
    store = RedisStore(redis_server.url, prefix=PREFIX, timeout=STORE_TIMEOUT)
    middleware = ChatStreamMiddleware(
        Starlette(),
        chat_stream=chat_stream,
        serve=True,
        callback=outcomes,
        session_store=store,
        secret_key="soak",
        metrics=True,
    )
    direct = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with LiveServer(DisconnectProbe(middleware, hooks)) as live:
            with live.client() as http:
                for _ in range(3):  # warm: the first chats allocate what every later one reuses
                    warm = http.post("/chat_stream", json={"user_input": "warm up", "max_new_tokens": REPLY_TOKENS})
                    assert warm.status_code == 200
                    http.cookies.clear()
            assert outcomes.wait_count(3)
            rss_before, threads_before = settled_rss_bytes(), threads_now()
            soak = Soak(live.url, plans, hooks, outcomes, prompts)
            started = time.monotonic()
            faults = threading.Thread(target=chaos, args=(soak, redis_server))
            faults.start()
            with ThreadPoolExecutor(CLIENTS, thread_name_prefix="soak-client") as pool:
                for done in [pool.submit(client, soak, live.url) for _ in range(CLIENTS)]:
                    done.result()  # a client's failed assertion fails the test here
            faults.join(HANG_GUARD)
            assert not faults.is_alive()
            elapsed = time.monotonic() - started

            admitted = {chat_id: seen.expected for chat_id, seen in soak.seen.items() if seen.expected is not None}
            assert outcomes.wait_count(3 + len(admitted))
            load = chat_stream.load()  # slots are freed before callbacks: nothing may hold one now
            rss_after = settled_rss_bytes()
            report(soak, elapsed, rss_before, rss_after, engine, hooks)
            with live.client() as http:
                metrics = http.get("/metrics").text

            assert len({chat_id[:5] for chat_id in soak.seen}) == CHATS + BURST
            by_chat = outcomes.by_chat()
            by_chat.pop("")  # the warm-up
            wrong = {
                chat_id: (soak.seen[chat_id].window, admitted.get(chat_id), by_chat.get(chat_id))
                for chat_id in soak.seen
                if by_chat.get(chat_id, []) != ([admitted[chat_id]] if chat_id in admitted else [])
            }
            assert not wrong, f"{len(wrong)} chats with a missing, extra or wrong outcome: {wrong}"
            assert not set(by_chat) - set(soak.seen)
            assert (load["processing"], load["waiting"]) == (0, 0)
            assert not list(direct.scan_iter(f"{PREFIX}lock:*")), "a turn lock outlived its chat"
            assert not list(direct.scan_iter(f"{PREFIX}ending:*"))
            # Injected failures: each admitted poisoned prefill failed once; failed decode steps
            # that held healthy rows too failed only the poisoned ones (the outcomes above).
            assert hooks.prefill_failures == sum(1 for c in admitted if soak.seen[c].window == "prefill_fail")
            # (A poisoned prompt is ten times a healthy one's length: it steps in a group of its own,
            # so healthy rows rarely share its failing step; test_batching's
            # test_a_decode_failure_of_one_row_fails_only_that_chat proves a shared step's retry.)
            assert hooks.decode_failures > 0
            played = {soak.seen[chat_id].window for chat_id in admitted}
            assert played >= {*PARTS, "queued"} - {"queued_leave"}  # every window was played
            statuses = Counter(seen.status for seen in soak.seen.values())
            assert metric(metrics, "chatstream_requests_rejected_total", code="too_many_requests") == statuses[429]
            assert (
                metric(metrics, "chatstream_requests_rejected_total", code="session_store_unavailable")
                == (statuses[503])
            )
            # Threads: none a chat started is left, and the engine's own still run. (A thread of an
            # earlier test, such as trio's idle worker, may end meanwhile: that is not a leak.)
            assert wait_until(lambda: threads_now() <= threads_before), threads_now() - threads_before
            assert {thread for thread in threads_before if thread.name.startswith("chatstream-")} <= threads_now()
            assert rss_after - rss_before < RSS_SLACK + engine.conversations.nbytes
    finally:
        chat_stream.close()
        direct.close()
        redis_server.thaw()
        redis_server.stop()
    # Once the server and the engine stop, every thread they started has ended.
    assert wait_until(lambda: threads_now() <= threads_at_start), threads_now() - threads_at_start


def report(soak: Soak, elapsed: float, rss_before: int, rss_after: int, engine: Any, hooks: ChaosHooks) -> None:
    """The figures of the run, for the README (`-s` shows them)."""
    seen = list(soak.seen.values())
    admitted = [s for s in seen if s.expected is not None]
    stalls = [(start, end + 2 * STORE_TIMEOUT) for start, end in soak.freezes]  # and the calls it held up

    def during_a_stall(s: Seen) -> bool:
        return any(s.sent_at < end and s.sent_at + s.latency > start for start, end in stalls)

    in_burst = {id(s) for s in burst_of(soak)}
    refusals = [s for s in seen if s.status == 429]
    print(
        f"\nchaos soak: seed {SEED}, {CHATS} chats from {CLIENTS} clients + {BURST} in one burst, "
        f"{len(seen)} requests with retries, in {elapsed:.1f} s; {SLOTS} slots + {QUEUE} queued; "
        f"Redis frozen {len(soak.freezes)}x {FREEZE_SECONDS} s"
    )
    print("  admitted, by window:", dict(sorted(Counter(s.window for s in admitted).items())))
    print("  outcomes:", dict(sorted(Counter(s.expected for s in admitted).items())))
    print("  refused, by status:", dict(sorted(Counter(s.status for s in seen if s.expected is None).items())))
    for name, group in [
        ("429 in the burst", [s for s in refusals if id(s) in in_burst]),
        ("429 in steady overload", [s for s in refusals if id(s) not in in_burst and not during_a_stall(s)]),
        ("429 while Redis stalled", [s for s in refusals if id(s) not in in_burst and during_a_stall(s)]),
    ]:
        if group:
            ms = sorted(s.latency * 1000 for s in group)
            print(
                f"  {name}: {len(ms)}, latency ms median {statistics.median(ms):.1f}, "
                f"p99 {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.1f}, max {ms[-1]:.1f}"
            )
    print(
        f"  injected: {hooks.prefill_failures} prefill failures, {hooks.decode_failures} failed decode steps "
        f"({hooks.mixed_batch_failures} of them batched with healthy rows)"
    )
    print(
        f"  RSS MiB: before {rss_before / 2**20:.0f}, at each tenth of the run "
        f"{[round(rss / 2**20) for rss in soak.rss]}, after {rss_after / 2**20:.0f} "
        f"(before and after: collected and trimmed; the conversation cache holds "
        f"{engine.conversations.nbytes / 2**20:.1f} MiB of it)"
    )


def burst_of(soak: Soak) -> list[Seen]:
    return [seen for chat_id, seen in soak.seen.items() if chat_id.startswith("b")]
