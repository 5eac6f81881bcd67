"""The deploy recipe run for real: two `chatstream-asgi serve` replicas sharing a Redis that keeps
an append-only file, behind nginx running deploy/nginx/chatstream.conf (only its PLACEHOLDER lines
changed). Conversations stick to one replica and go on across a replica's crash, a Redis restart
and a deploy (SIGTERM); nginx retries only what never ran and answers its own errors in the
server's JSON shape. Each scenario writes its figures to `$CHATSTREAM_ARTIFACTS/deploy_figures.json`
for docs/deploy.md. The Dockerfile and the Kubernetes manifests are checked for what the doc
promises (CI also runs hadolint and kubernetes-validate on them: .ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import HANG_GUARD, RedisServer, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "deploy" / "nginx" / "chatstream.conf"
SECRET_KEY = "deploy-recipe-test-key"
SHORT = 16  # tokens of a normal turn (the test model never ends a reply by itself)
LONG = 800  # tokens of a turn that must still be running when something happens to its replica


def _nginx_binary() -> str:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: .ci/run installs it (Debian package nginx)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return binary


def _record_figures(scenario: str, figures: dict[str, Any]) -> None:
    """Merge one scenario's figures into $CHATSTREAM_ARTIFACTS/deploy_figures.json (docs/deploy.md)."""
    folder = os.environ.get("CHATSTREAM_ARTIFACTS")
    if not folder:
        return
    path = Path(folder) / "deploy_figures.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[scenario] = figures
    existing["measured_on"] = f"pytest tests/test_deploy_recipe.py, the test model, {os.cpu_count()} CPU cores"
    path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")


# --- the processes: Redis, replicas, nginx ---------------------------------------------------


class _Replica:
    """One server process on a port of its own, restartable on that port: `chatstream-asgi serve`
    with `options`, or plain uvicorn serving the test app module `app` (configured by `env`)."""

    def __init__(
        self, folder: Path, options: list[str], *, app: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self._folder, self._options, self._app, self._env = folder, options, app, env or {}
        self.log = folder / f"replica-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._app is None:
            command = [sys.executable, "-m", "chatstream_asgi", "serve", "--port", str(self.port), *self._options]
        else:
            command = [sys.executable, "-m", "uvicorn", self._app, "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe would stall the server
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "HOME": str(self._folder), **self._env},
            )

    def kill(self) -> None:
        if self.process is not None and self.alive():
            self.process.kill()
        if self.process is not None:
            self.process.wait(HANG_GUARD)

    def wait_ready(self) -> None:
        assert wait_until(lambda: self.ready()[0] == 200 or not self.alive(), timeout=90)
        assert self.alive(), self.log.read_text()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> tuple[int, dict[str, Any]]:
        """`/ready` asked directly, not through nginx: (status, JSON), or (0, {}) when unreachable."""
        try:
            response = httpx.get(f"{self.url}/ready", timeout=5)
            return response.status_code, response.json()
        except (httpx.TransportError, ValueError):
            return 0, {}

    def processing(self) -> int:
        load: int = self.ready()[1].get("load", {}).get("processing", 0)
        return load


class _Nginx:
    """nginx running the recipe as any user: its own prefix, pid, logs and temp folders in tmp."""

    def __init__(self, folder: Path, replicas: list[str]) -> None:
        self._binary = _nginx_binary()
        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = folder / "access.log"
        (folder / "chatstream.conf").write_text(render_recipe(replicas, self.port))
        temp = " ".join(
            f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (folder / "nginx.conf").write_text(
            "worker_processes 1;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    {temp}\n"
            # Which replica answered each request, after which retries: the test reads it.
            "    log_format upstreams\n"
            "        '$cookie_chatstream_session|$upstream_addr|$upstream_status|$status|$request_uri';\n"
            f"    access_log {self.access_log} upstreams;\n"
            f"    include {folder / 'chatstream.conf'};\n"
            "}\n"
        )
        user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would be `nobody`
        self._globals = f"daemon off; pid {folder / 'nginx.pid'}; error_log {folder / 'error.log'}; {user}"
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        return [
            self._binary,
            "-p",
            str(self._folder),
            "-c",
            str(self._folder / "nginx.conf"),
            "-g",
            self._globals,
            *extra,
        ]

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=HANG_GUARD)

    def start(self) -> None:
        checked = self.check()
        assert checked.returncode == 0, checked.stderr
        self._process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self._listens), (self._folder / "error.log").read_text()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(HANG_GUARD)

    def _listens(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log_lines(self) -> list[dict[str, str]]:
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        fields = ("cookie", "upstream", "upstream_status", "status", "uri")
        return [dict(zip(fields, line.split("|"), strict=True)) for line in lines]

    def replica_of(self, client: httpx.Client) -> str:
        """The replica that answered this conversation's last chat (its cookie's hash picks it)."""
        cookie = client.cookies["chatstream_session"]
        found: list[str] = []

        def logged() -> bool:
            found[:] = [
                line["upstream"].split(", ")[-1]
                for line in self.log_lines()
                if line["cookie"] == cookie and line["uri"].startswith("/chat_stream")
            ]
            return bool(found)

        assert wait_until(logged)
        return found[-1]


def render_recipe(replicas: list[str], port: int) -> str:
    """deploy/nginx/chatstream.conf with its PLACEHOLDER lines' values replaced, nothing else."""
    lines = RECIPE.read_text().splitlines(keepends=True)
    placeholders = [i for i, line in enumerate(lines) if "# PLACEHOLDER" in line]
    assert len(placeholders) == 3, "the recipe marks two replica lines and one listen line"
    first, second, listen = placeholders
    for index, address in ((first, replicas[0]), (second, replicas[1])):
        lines[index], count = re.subn(r"server \S+:\d+ ", f"server {address} ", lines[index])
        assert count == 1, lines[index]
    lines[listen], count = re.subn(r"listen \S+;", f"listen 127.0.0.1:{port};", lines[listen])
    assert count == 1, lines[listen]
    return "".join(lines)


@dataclass
class _Cluster:
    redis: RedisServer
    replicas: list[_Replica]
    nginx: _Nginx

    @property
    def url(self) -> str:
        return self.nginx.url

    def ensure_up(self) -> None:
        """Every replica running and ready (a scenario before may have killed one)."""
        for replica in self.replicas:
            if not replica.alive():
                replica.start()
        for replica in self.replicas:
            replica.wait_ready()
        # nginx takes a replica that failed (or answered 503) out of rotation for fail_timeout.
        assert wait_until(self._nginx_routes_to_every_replica)

    def _nginx_routes_to_every_replica(self) -> bool:
        seen = len(self.nginx.log_lines())
        for _ in self.replicas:  # a request without a cookie goes round robin
            httpx.get(f"{self.url}/health", timeout=HANG_GUARD)
        routed = {line["upstream"] for line in self.nginx.log_lines()[seen:]}
        return routed == {replica.address for replica in self.replicas}

    def replica(self, address: str) -> _Replica:
        return next(replica for replica in self.replicas if replica.address == address)

    def client(self) -> httpx.Client:
        """A browser of its own: its own cookie jar, so its own conversation."""
        return httpx.Client(base_url=self.url, timeout=HANG_GUARD)


def _replica_options(model_dir: Path, redis_url: str) -> list[str]:
    """`serve` as the recipe runs it: the shared Redis, one secret key, a drain of 30 s."""
    return [
        *("--model", str(model_dir), "--session-store", redis_url, "--secret-key", SECRET_KEY),
        *f"--no-webui --metrics --max-new-tokens {LONG} --context-len 4096 --concurrency 4 --queue 16".split(),
        *("--shutdown-timeout", "30"),
    ]


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Cluster]:
    _nginx_binary()
    folder = tmp_path_factory.mktemp("deploy")
    redis = RedisServer(aof_dir=folder)
    redis.start()
    replicas = [_Replica(folder, _replica_options(model_dir, redis.url)) for _ in range(2)]
    nginx = _Nginx(folder / "nginx", [replica.address for replica in replicas])
    running = _Cluster(redis, replicas, nginx)
    try:
        nginx.start()
        running.ensure_up()
        yield running
    finally:
        nginx.stop()
        for replica in replicas:
            replica.kill()
        redis.stop()


# --- a client, and what each of its turns ended as ---------------------------------------------


@dataclass
class _Attempt:
    """What one POST /chat_stream ended as."""

    status: int  # 0: no HTTP response at all
    text: str = ""
    complete: bool = False  # the reply ended cleanly: delta's chunked end, SSE's `event: done`
    cut: bool = False  # it started and then broke off: RemoteProtocolError / no `event: done`
    error: str | None = None  # the error JSON's code, or an SSE stream's `event: error` code
    content_type: str = ""
    retry_after: float | None = None
    broken: bool = False  # httpx raised RemoteProtocolError: the body ended without its chunked end
    sent_at: float = 0.0  # time.monotonic() when it was sent, when its head came, and when it ended
    answered_at: float = 0.0
    ended_at: float = 0.0


def _sse_reply(raw: str) -> tuple[str, bool, str | None]:
    """The reply an SSE stream carried, whether it ended with `event: done`, and the code of its
    `event: error` if it had one."""
    text, done, error = "", False, None
    for frame in raw.replace("\r\n", "\n").split("\n\n"):
        lines = frame.split("\n")
        event = next((line[len("event: ") :] for line in lines if line.startswith("event: ")), "message")
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        if event == "message" and data:
            text += json.loads(data)["delta"]
        if event == "error":
            error = json.loads(data)["error"]
        done = done or event == "done"
    return text, done, error


def _chat(
    client: httpx.Client,
    user_input: str,
    *,
    max_new_tokens: int = SHORT,
    sse: bool = False,
    on_first_text: Callable[[], None] | None = None,
) -> _Attempt:
    """One turn as a client sends it, read to its end (or its cut)."""
    sent_at = time.monotonic()
    answered: list[float] = []
    attempt = _send_turn(
        client, user_input, max_new_tokens=max_new_tokens, sse=sse, on_first_text=on_first_text, answered=answered
    )
    attempt.sent_at, attempt.ended_at = sent_at, time.monotonic()
    attempt.answered_at = answered[0] if answered else attempt.ended_at
    return attempt


def _send_turn(
    client: httpx.Client,
    user_input: str,
    *,
    max_new_tokens: int,
    sse: bool,
    on_first_text: Callable[[], None] | None,
    answered: list[float],
) -> _Attempt:
    path = "/chat_stream?format=sse" if sse else "/chat_stream"
    try:
        with client.stream("POST", path, json={"user_input": user_input, "max_new_tokens": max_new_tokens}) as response:
            answered.append(time.monotonic())  # the head: the server took (or refused) the turn
            content_type = response.headers.get("content-type", "")
            if response.status_code != 200:
                response.read()
                retry_after = response.headers.get("retry-after")
                body = response.json() if content_type.startswith("application/json") else {}
                return _Attempt(
                    response.status_code,
                    error=body.get("error"),
                    content_type=content_type,
                    retry_after=float(retry_after) if retry_after else None,
                )
            raw, cut, started = "", False, False
            try:
                for piece in response.iter_text():
                    raw += piece
                    # Reply text, not only the stream's first frames (SSE's `retry:`, queue events).
                    if not started and (piece if not sse else '"delta"' in raw) and on_first_text is not None:
                        started = True
                        on_first_text()
            except httpx.RemoteProtocolError:  # the body broke off without its chunked end
                cut = True
    except httpx.TransportError:
        return _Attempt(0)
    if sse:
        text, done, error = _sse_reply(raw)
        complete = done and not cut
        return _Attempt(
            200, text, complete=complete, cut=not complete, error=error, content_type=content_type, broken=cut
        )
    return _Attempt(200, raw, complete=not cut, cut=cut, content_type=content_type, broken=cut)


@dataclass
class _Conversation:
    """One browser's conversation and every turn that completed in it, as the client saw them."""

    client: httpx.Client
    kept: list[tuple[str, str]] = field(default_factory=list)  # (user input, reply) of completed turns
    cut: int = 0

    def turn(self, user_input: str, **options: Any) -> _Attempt:
        attempt = _chat(self.client, user_input, **options)
        if attempt.complete:
            self.kept.append((user_input, attempt.text))
        self.cut += attempt.cut
        return attempt

    def careful_turn(self, user_input: str, **options: Any) -> list[_Attempt]:
        """Send until the turn completes, as a careful client does: after a 409 or a 5xx, wait
        what Retry-After says (else a quarter second); after a cut reply, send it again (a cut
        turn is not in the history)."""
        attempts: list[_Attempt] = []
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            attempts.append(self.turn(user_input, **options))
            if attempts[-1].complete:
                break
            time.sleep(min(attempts[-1].retry_after or 0.25, 5.0))
        return attempts

    def history(self) -> list[tuple[str, str]]:
        response = self.client.get("/get_history")
        assert response.status_code == 200, response.text
        messages = response.json()["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(users)
        return list(zip(users, replies, strict=True))


def _conversations_on(cluster: _Cluster, count: int, *, per_replica: int) -> list[_Conversation]:
    """`count` conversations with two turns each, at least `per_replica` of them on each replica."""
    conversations: list[_Conversation] = []
    for _ in range(count + 24):
        conversation = _Conversation(cluster.client())
        # The first turn (no cookie yet) lands anywhere; from the second on, the cookie's hash decides.
        assert conversation.turn(f"hello {len(conversations)}").complete
        assert conversation.turn(f"and again {len(conversations)}").complete
        conversations.append(conversation)
        placed = [cluster.nginx.replica_of(c.client) for c in conversations]
        if len(conversations) >= count and all(placed.count(r.address) >= per_replica for r in cluster.replicas):
            return conversations
    raise AssertionError("the cookie hash never spread the conversations over both replicas")


# --- the recipe itself --------------------------------------------------------------------------


def test_the_recipe_changes_only_its_placeholder_lines_and_passes_nginx_t(tmp_path: Path) -> None:
    nginx = _Nginx(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"])
    checked = nginx.check()
    assert checked.returncode == 0, checked.stderr
    original = RECIPE.read_text().splitlines()
    rendered = (tmp_path / "chatstream.conf").read_text().splitlines()
    changed = [new for old, new in zip(original, rendered, strict=True) if old != new]
    assert len(changed) == 3 and all("# PLACEHOLDER" in line for line in changed)


def test_nginx_answers_its_own_errors_in_the_servers_json_shape(tmp_path: Path) -> None:
    nginx = _Nginx(tmp_path, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])  # nobody listens
    nginx.start()
    try:
        with httpx.Client(base_url=nginx.url, timeout=HANG_GUARD) as client:
            down = client.post("/chat_stream", json={"user_input": "anyone?"})
            too_large = client.post("/chat_stream", content=b"x" * (2 << 20))
            metrics = client.get("/metrics")
    finally:
        nginx.stop()
    assert down.status_code == 502 and down.headers["content-type"] == "application/json"
    assert down.json()["error"] == "generation_failed" and down.headers["retry-after"] == "5"
    assert too_large.status_code == 413 and too_large.json()["error"] == "body_too_large"
    assert metrics.status_code == 404 and metrics.json()["error"] == "not_found"


# --- the scenarios, through the real nginx ------------------------------------------------------


def test_conversations_through_nginx_stick_to_one_replica_and_keep_every_turn(cluster: _Cluster) -> None:
    cluster.ensure_up()
    conversations = [_Conversation(cluster.client()) for _ in range(8)]

    def talk(index: int) -> None:
        for turn in range(4):
            attempt = conversations[index].turn(f"conversation {index} turn {turn}")
            assert attempt.status == 200 and attempt.complete, attempt

    with ThreadPoolExecutor(len(conversations)) as pool:
        list(pool.map(talk, range(len(conversations))))
    for conversation in conversations:
        assert conversation.history() == conversation.kept
    cookies = {c.client.cookies["chatstream_session"] for c in conversations}
    lines = [line for line in cluster.nginx.log_lines() if line["cookie"] in cookies]
    served_by = {cookie: {line["upstream"] for line in lines if line["cookie"] == cookie} for cookie in cookies}
    assert all(len(replicas) == 1 for replicas in served_by.values()), served_by  # sticky
    per_replica = {r.address: sum(r.address in s for s in served_by.values()) for r in cluster.replicas}
    _record_figures(
        "conversations",
        {
            "conversations": len(conversations),
            "turns_each": 4,
            "turns_in_history": sum(len(c.kept) for c in conversations),
            "conversations_per_replica": sorted(per_replica.values()),
            "replicas_per_conversation_after_its_first_turn": 1,
        },
    )


def test_a_browsers_chat_through_nginx_passes_the_replicas_origin_check(cluster: _Cluster) -> None:
    """A page's POSTs carry the cookie and their Origin (nginx's address, port included): the
    recipe passes the Host with its port, so a replica takes them as its own origin's."""
    cluster.ensure_up()
    with httpx.Client(base_url=cluster.url, timeout=HANG_GUARD, headers={"Origin": cluster.url}) as page:
        first = page.post("/chat_stream", json={"user_input": "hello", "max_new_tokens": SHORT})
        second = page.post("/chat_stream", json={"user_input": "again", "max_new_tokens": SHORT})  # with the cookie
        cleared = page.post("/clear_context", json={})
    assert first.status_code == second.status_code == cleared.status_code == 200, (second.text, cleared.text)


def test_a_replica_killed_mid_turn_loses_only_the_turns_it_was_streaming(cluster: _Cluster) -> None:
    cluster.ensure_up()
    conversations = _conversations_on(cluster, 4, per_replica=2)
    placed: dict[str, list[_Conversation]] = {replica.address: [] for replica in cluster.replicas}
    for conversation in conversations:
        placed[cluster.nginx.replica_of(conversation.client)].append(conversation)
    victim, survivor = (cluster.replica(address) for address in placed)
    # Two long turns on each replica, one delta and one SSE, all streaming when the victim dies.
    chosen = placed[victim.address][:2] + placed[survivor.address][:2]
    streaming = [threading.Event() for _ in chosen]
    killed_at: list[float] = []
    results: dict[int, dict[str, Any]] = {}

    def converse(index: int) -> None:
        conversation = chosen[index]
        long = conversation.turn(
            f"long {index}", max_new_tokens=LONG, sse=index % 2 == 1, on_first_text=streaming[index].set
        )
        streaming[index].set()  # also when it never streamed: the test then fails below, not here
        attempts = conversation.careful_turn(f"after {index}")
        results[index] = {"long": long, "attempts": attempts, "recovered_at": attempts[-1].answered_at}

    with ThreadPoolExecutor(len(chosen)) as pool:
        futures = [pool.submit(converse, index) for index in range(len(chosen))]
        assert all(event.wait(HANG_GUARD) for event in streaming)
        assert wait_until(lambda: victim.processing() == 2)
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        for future in futures:
            future.result()

    recovery: list[float] = []
    lost = 0
    for index, conversation in enumerate(chosen):
        long, attempts = results[index]["long"], results[index]["attempts"]
        on_victim = index < 2
        assert long.status == 200 and (long.cut if on_victim else long.complete), (index, long)
        assert attempts[-1].complete, attempts  # the conversation goes on
        assert all(a.status in (200, 409, 502) for a in attempts), attempts
        history = conversation.history()
        lost += sum(turn not in history for turn in conversation.kept)
        assert history == conversation.kept  # every completed turn, no cut one
        if on_victim:
            recovery.append(results[index]["recovered_at"] - killed_at[0])
    # Each try of the killed replica's conversations: (status, sent, ended), seconds after the kill.
    timeline = [
        [
            (a.status, round(a.sent_at - killed_at[0], 2), round(a.ended_at - killed_at[0], 2))
            for a in results[i]["attempts"]
        ]
        for i in (0, 1)
    ]
    # The promise: every conversation's next turn is served within 5 s of the kill (its 200
    # head; the reply itself then takes as long as the busy survivor needs). Freed by the lock's
    # TTL (3 s), not by a restart: the TTL, and at most one Retry-After (1 s) of a careful client.
    assert max(recovery) < 5.0, (recovery, timeline)
    _record_figures(
        "crash",
        {
            "conversations_mid_turn": len(chosen),
            "on_killed_replica": 2,
            "conversations_continued": len(chosen),
            "seconds_to_recover": [round(s, 2) for s in recovery],
            "turns_cut": sum(c.cut for c in chosen),
            "completed_turns_lost": lost,
            "statuses_seen_before_recovering": sorted({a.status for i in (0, 1) for a in results[i]["attempts"][:-1]}),
            "retry_after_seen": sorted(
                {a.retry_after for i in (0, 1) for a in results[i]["attempts"] if a.retry_after}
            ),
            "attempts_to_recover": [len(results[i]["attempts"]) for i in (0, 1)],
            "tries_status_sent_ended_seconds_after_the_kill": timeline,
        },
    )


REDIS_OUTAGE = 5.0  # seconds Redis stays down: the outage the issue measured


def test_a_redis_restart_keeps_every_conversation_and_chats_resume(cluster: _Cluster) -> None:
    cluster.ensure_up()
    conversations = [_Conversation(cluster.client()) for _ in range(4)]
    for index, conversation in enumerate(conversations):
        assert conversation.turn(f"before the restart {index}").complete
    cluster.redis.stop()
    stopped_at = time.monotonic()
    chats: list[_Attempt] = []  # every turn the clients sent during the outage
    ready: list[tuple[int, str | None]] = []  # every /ready answer of each replica, asked directly
    try:
        # Clients keep sending and a balancer keeps asking /ready, for the whole outage; a turn
        # through nginx is refused at once, so each round is paced as a client retrying would.
        while time.monotonic() - stopped_at < REDIS_OUTAGE:
            chats += [conversation.turn("during the outage") for conversation in conversations]
            ready += [(status, body.get("status")) for status, body in (r.ready() for r in cluster.replicas)]
            time.sleep(0.25)
        direct = httpx.post(f"{cluster.replicas[0].url}/chat_stream", json={"user_input": "direct"}, timeout=HANG_GUARD)
    finally:
        cluster.redis.start()
    back_at = time.monotonic()
    assert direct.status_code == 503 and direct.json()["error"] == "session_store_unavailable"
    from_replica = [c for c in chats if (c.status, c.error) == (503, "session_store_unavailable")]
    from_nginx = [c for c in chats if (c.status, c.error) == (502, "generation_failed")]  # every replica out
    assert len(from_replica) + len(from_nginx) == len(chats), chats  # nothing else: no HTML, no 200
    assert all(c.content_type.startswith("application/json") for c in chats)
    assert (503, "session_store_unavailable") in ready and (200, "ready") not in ready[len(cluster.replicas) :], ready

    resumed: list[float] = []
    refused_after: list[int] = []  # statuses of the turns refused once Redis was back
    for index, conversation in enumerate(conversations):
        attempts = conversation.careful_turn(f"after the restart {index}")
        assert attempts[-1].complete, attempts
        resumed.append(time.monotonic() - back_at)
        refused_after += [attempt.status for attempt in attempts[:-1]]
        assert conversation.history() == conversation.kept  # nothing lost: the append-only file
    _record_figures(
        "redis_restart",
        {
            "conversations": len(conversations),
            "conversations_intact": len(conversations),
            "outage_seconds": round(back_at - stopped_at, 2),
            "turns_sent_during_outage": len(chats),
            "of_them_503_session_store_unavailable_from_a_replica": len(from_replica),
            "of_them_502_generation_failed_from_nginx": len(from_nginx),
            "ready_answers_during_outage": {
                f"{code} {status}": ready.count((code, status)) for code, status in set(ready)
            },
            "seconds_to_first_successful_turn": round(resumed[0], 2),
            "seconds_until_every_conversation_had_a_turn": round(resumed[-1], 2),
            "turns_refused_after_redis_was_back": refused_after,
        },
    )


def test_a_deploy_drains_one_replica_while_nginx_moves_new_chats_to_the_other(cluster: _Cluster) -> None:
    cluster.ensure_up()
    conversations = _conversations_on(cluster, 3, per_replica=3)
    draining = cluster.replica(cluster.nginx.replica_of(conversations[0].client))
    movers = [c for c in conversations[1:] if cluster.nginx.replica_of(c.client) == draining.address][:2]
    assert draining.process is not None
    streaming = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(
            conversations[0].turn, "a long reply across the deploy", max_new_tokens=LONG, on_first_text=streaming.set
        )
        assert streaming.wait(HANG_GUARD)
        lines_before = len(cluster.nginx.log_lines())
        draining.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        assert wait_until(lambda: draining.ready()[1].get("status") == "shutting_down")
        assert draining.ready()[0] == 503  # out of rotation for any balancer reading /ready
        # New chats during the drain: two that hash to the draining replica, two new browsers.
        during = [mover.turn("during the deploy") for mover in movers]
        during += [_Conversation(cluster.client()).turn("a new browser") for _ in range(2)]
        still_streaming = not long.done()
        finished = long.result()
    code = draining.process.wait(HANG_GUARD * 2)
    drained_in = time.monotonic() - signalled_at
    assert all(attempt.status == 200 and attempt.complete for attempt in during), during  # no error seen
    assert finished.complete  # the chat the deploy found running finished
    assert code == 0, draining.log.read_text()
    assert "Traceback" not in draining.log.read_text()
    for conversation in [conversations[0], *movers]:
        assert conversation.history() == conversation.kept
    retried = [
        line
        for line in cluster.nginx.log_lines()[lines_before:]
        if line["upstream_status"].startswith("503, ") and line["status"] == "200"
    ]
    assert retried  # nginx met the drain's 503 shutting_down and sent the chat to the other replica
    _record_figures(
        "deploy",
        {
            "new_chats_during_drain": len(during),
            "of_them_hashed_to_the_draining_replica": len(movers),
            "errors_clients_saw": sum(not attempt.complete for attempt in during),
            "retried_by_nginx_after_503": len(retried),
            "running_chat_finished": True,
            "it_was_still_streaming_while_new_chats_moved": still_streaming,
            "exit_code": code,
            "seconds_from_sigterm_to_exit": round(drained_in, 2),
        },
    )


# --- replies the server cuts, through the real nginx ---------------------------------------------


FAIL_AFTER = 6  # decode steps cut_app's model takes before it fails mid-reply


@dataclass
class _CutServers:
    """Replicas made to cut their replies, each alone behind an nginx of its own running the recipe
    (both its replica lines name the one replica)."""

    stopping: _Replica  # `serve --shutdown-timeout 0`: SIGTERM cuts what it streams
    failing: _Replica  # tests/cut_app.py: its model fails mid-reply
    front: _Replica  # `serve --upstream` in front of a replica of the cluster
    upstream: _Replica  # that replica of the cluster
    nginx: dict[str, _Nginx]  # "stopping", "failing", "front"


@pytest.fixture(scope="module")
def cut_servers(cluster: _Cluster, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_CutServers]:
    folder = tmp_path_factory.mktemp("cut")
    # The front's upstream is a running replica of the cluster (a scenario before may have
    # stopped the other), so nothing restarts for it; the front's scenario kills it last.
    if not any(replica.alive() for replica in cluster.replicas):
        cluster.ensure_up()
    upstream = next(replica for replica in cluster.replicas if replica.alive())
    upstream.wait_ready()
    model_name = httpx.get(f"{upstream.url}/v1/models", timeout=HANG_GUARD).json()["data"][0]["id"]
    small = ["--no-webui", "--max-new-tokens", str(LONG), "--concurrency", "4"]
    stopping = _Replica(folder, ["--model", str(model_dir), *small, "--shutdown-timeout", "0"])
    failing = _Replica(
        folder,
        [],
        app="tests.cut_app:app",
        env={"CHATSTREAM_TEST_MODEL": str(model_dir), "CHATSTREAM_TEST_FAIL_AFTER": str(FAIL_AFTER)},
    )
    front = _Replica(folder, ["--upstream", upstream.url, "--upstream-model", model_name, *small])
    servers = _CutServers(stopping, failing, front, upstream, {})
    try:
        for replica in (stopping, failing, front):  # they load at the same time
            replica.start()
        for name, replica in (("stopping", stopping), ("failing", failing), ("front", front)):
            replica.wait_ready()
            servers.nginx[name] = _Nginx(folder / f"nginx-{name}", [replica.address, replica.address])
            servers.nginx[name].start()
        yield servers
    finally:
        for nginx in servers.nginx.values():
            nginx.stop()
        for replica in (stopping, failing, front):
            replica.kill()


def _a_delta_and_an_sse_reply(url: str, cut: Callable[[], None] | None = None) -> dict[str, _Attempt]:
    """A delta and an SSE reply through the nginx at `url`, each from a browser of its own; with
    `cut`, it runs once both are streaming text."""
    streaming = {"delta": threading.Event(), "sse": threading.Event()}

    def reply(name: str) -> _Attempt:
        with httpx.Client(base_url=url, timeout=HANG_GUARD) as client:
            attempt = _chat(
                client, f"cut {name}", max_new_tokens=LONG, sse=name == "sse", on_first_text=streaming[name].set
            )
        streaming[name].set()  # also when it never streamed: the test then fails on the attempt
        return attempt

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(reply, name) for name in streaming}
        if cut is not None:
            assert all(event.wait(HANG_GUARD) for event in streaming.values())
            cut()
        return {name: future.result() for name, future in futures.items()}


def _assert_recognisably_cut(replies: dict[str, _Attempt]) -> None:
    """httpx raises on the delta reply (no chunked end); the SSE reply has no `event: done` and
    says `event: error`."""
    delta, sse = replies["delta"], replies["sse"]
    assert delta.status == 200 and delta.text and delta.broken and not delta.complete, delta
    assert sse.status == 200 and sse.text and sse.cut and sse.error is not None, sse


def _record_cut(scenario: str, replies: dict[str, _Attempt]) -> None:
    delta, sse = replies["delta"], replies["sse"]
    _record_figures(
        f"cut_by_{scenario}",
        {
            "delta": "httpx.RemoteProtocolError" if delta.broken else "ended cleanly",
            "sse": ("no event: done" if sse.cut else "event: done")
            + (f", event: error {sse.error}" if sse.error else "")
            + (", then httpx.RemoteProtocolError" if sse.broken else ", chunked body ended"),
            "characters_streamed_before_the_cut": {"delta": len(delta.text), "sse": len(sse.text)},
        },
    )


def test_through_nginx_a_reply_cut_by_sigterm_past_the_shutdown_timeout_is_recognisably_cut(
    cut_servers: _CutServers,
) -> None:
    stopping = cut_servers.stopping
    assert stopping.process is not None

    def sigterm() -> None:
        assert wait_until(lambda: stopping.processing() == 2)
        assert stopping.process is not None
        stopping.process.send_signal(signal.SIGTERM)

    replies = _a_delta_and_an_sse_reply(cut_servers.nginx["stopping"].url, sigterm)
    assert stopping.process.wait(HANG_GUARD) == 0, stopping.log.read_text()
    _assert_recognisably_cut(replies)
    assert replies["sse"].error == "shutting_down"
    _record_cut("shutdown_timeout", replies)


def test_through_nginx_a_reply_cut_by_an_engine_failure_is_recognisably_cut(cut_servers: _CutServers) -> None:
    replies = _a_delta_and_an_sse_reply(cut_servers.nginx["failing"].url)  # the model fails by itself
    _assert_recognisably_cut(replies)
    _record_cut("engine_failure", replies)


def test_through_nginx_a_reply_cut_by_its_upstream_dying_in_front_mode_is_recognisably_cut(
    cut_servers: _CutServers,
) -> None:
    upstream = cut_servers.upstream
    assert upstream.alive()

    def sigkill() -> None:
        assert wait_until(lambda: upstream.processing() == 2)
        upstream.kill()

    replies = _a_delta_and_an_sse_reply(cut_servers.nginx["front"].url, sigkill)
    _assert_recognisably_cut(replies)
    _record_cut("upstream_failure", replies)


# --- the container and the Kubernetes manifests -------------------------------------------------


def _manifests() -> dict[str, dict[str, Any]]:
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


def _proxy_next_upstream() -> str:
    match = re.search(r"^\s*proxy_next_upstream ([^;]+);", RECIPE.read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_the_kubernetes_manifests_probe_drain_and_share_what_the_doc_says() -> None:
    manifests = _manifests()
    deployment = manifests["Deployment/chatstream"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    args = container["args"]
    shutdown_timeout = float([args[i + 1] for i, arg in enumerate(args) if arg == "--shutdown-timeout"][-1])
    assert pod["terminationGracePeriodSeconds"] > shutdown_timeout + float(pre_stop[1])
    assert args[args.index("--session-store") + 1].startswith("redis://")
    secret = next(e for e in container["env"] if e["name"] == "CHATSTREAM_SECRET_KEY")
    assert "secretKeyRef" in secret["valueFrom"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert manifests["Service/chatstream"]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    redis = manifests["StatefulSet/redis"]["spec"]
    redis_args = redis["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--appendfsync") + 1] == "everysec"
    assert redis["volumeClaimTemplates"]
    assert "Service/redis" in manifests

    annotations = manifests["Ingress/chatstream"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "upstream-hash-by"] == "$cookie_chatstream_session"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert annotations[prefix + "proxy-next-upstream"] == _proxy_next_upstream()  # the same retries as the recipe


def test_the_dockerfile_runs_as_a_user_checks_health_and_stops_on_sigterm() -> None:
    lines = [line.strip() for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert any("/health" in line for line in instructions if "CMD" in line or line.startswith("HEALTHCHECK"))
    assert "STOPSIGNAL SIGTERM" in instructions and "EXPOSE 8000" in instructions
    entrypoint = json.loads(next(line for line in instructions if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :])
    assert entrypoint[:2] == ["chatstream-asgi", "serve"] and "0.0.0.0" in entrypoint
    assert any(".[redis" in line for line in instructions if line.startswith("RUN pip install"))
