"""The console chat: `chatstream-asgi chat` driven as a subprocess, and ChatStream's `handle_console_input`."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from chatstream_asgi import ChatPrompt, ChatStream
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine.mock import MockEngine
from chatstream_asgi.frontends.console import ConsoleConversation, run_console
from chatstream_asgi.runtime.service import ChatService

from .conftest import HANG_GUARD


def start_chat(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "chatstream_asgi", "chat", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def read_until(process: subprocess.Popen[bytes], done: Callable[[str], bool]) -> str:
    """What the process has written, read as it comes, until `done` holds (a hang guard bounds it)."""
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + HANG_GUARD
    while not done(seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; output so far: {seen!r}"
        ready, _, _ = select.select([process.stdout], [], [], left)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"the process ended; output: {seen!r}"
            seen += chunk
    return seen.decode()


def test_chat_streams_replies_to_piped_lines_and_exits_0_at_eof() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "chat", "--model", "mock"],
        input="hello there\nこんにちは 👋\n",
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 2,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello there\nこんにちは 👋\n"
    assert "/regenerate" in result.stderr and "Traceback" not in result.stderr


def test_lines_after_quit_are_ignored_and_the_chat_exits_cleanly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "chat", "--model", "mock"],
        input="hello\n/quit\n" + "typed after quit\n" * 5000,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 2,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr and "Error" not in result.stderr


class _Terminal(io.StringIO):
    """Output that says it is a terminal, as a person's console is."""

    def isatty(self) -> bool:
        return True


class _Lines(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_control_characters_from_the_model_are_not_sent_to_a_terminal() -> None:
    hostile = "fine\x1b]0;retitled\x07 text\x1b[2J\x9b31m\r\nnext line\tand a tab"
    service = ChatService(engine=MockEngine(text=hostile, tokens_per_second=1000), params=GenerationParams())
    terminal, pipe = _Terminal(), io.StringIO()
    try:
        await run_console(service, _Lines("hi\n"), terminal, io.StringIO())
        await run_console(service, _Lines("hi\n"), pipe, io.StringIO())
    finally:
        service.close()
    assert terminal.getvalue() == "fine]0;retitled text[2J31m\nnext line\tand a tab\n"
    assert pipe.getvalue() == hostile + "\n"  # a pipe gets the model's text as it is


def test_chat_keeps_the_conversation_and_clear_forgets_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "chat", "--model", "mock"],
        input="remember this\n/regenerate\n/clear\n/regenerate\nafter\n/quit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 2,
    )
    assert result.returncode == 0
    assert result.stdout == "remember this\nremember this\nafter\n"
    assert "(conversation cleared)" in result.stderr
    assert "no reply to regenerate" in result.stderr


def test_chat_with_a_real_model_streams_its_reply(model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "chat", "--model", str(model_dir), "--max-new-tokens", "8"],
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 2,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_ctrl_c_stops_the_reply_and_a_second_ctrl_c_exits_0() -> None:
    process = start_chat("--model", "mock")
    assert process.stdin is not None
    try:
        long_input = " ".join(f"word{i}" for i in range(300))  # 20 pieces a second: a long reply
        read_until(process, lambda text: "/quit" in text)  # the help line: ready
        process.stdin.write(long_input.encode() + b"\n")
        process.stdin.flush()
        read_until(process, lambda text: "word1 " in text)
        process.send_signal(signal.SIGINT)
        output = read_until(process, lambda text: "(stopped" in text)
        assert "word299" not in output
        process.send_signal(signal.SIGINT)
        assert process.wait(HANG_GUARD) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.anyio
async def test_handle_console_input_yields_chatstreams_tuples() -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000))
    pieces = [piece async for piece in chat_stream.handle_console_input("one two three")]
    assert [pos for _, _, pos in pieces] == ["begin"] + ["mid"] * (len(pieces) - 1)
    assert "".join(text for _, text, _ in pieces) == "one two three"
    assert pieces[-1][0] == "one two three<::EOS::>"


@pytest.mark.anyio
async def test_a_console_reply_holds_an_admission_slot_while_it_streams() -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000), num_of_concurrent_executions=1)
    conversation = ConsoleConversation(chat_stream.service)
    loads = [chat_stream.load()["processing"] async for _ in conversation.reply("one two three")]
    assert set(loads) == {1}
    assert chat_stream.load()["processing"] == 0


@pytest.mark.anyio
async def test_a_stopped_console_reply_keeps_what_was_shown() -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000))
    conversation = ConsoleConversation(chat_stream.service)
    shown = ""
    with anyio.CancelScope() as scope:
        async for piece in conversation.reply("alpha beta gamma delta"):
            shown += piece
            scope.cancel()
    assert shown and shown != "alpha beta gamma delta"
    assert conversation.prompt.get_responder_last_msg() == shown
    assert conversation.prompt.get_requester_last_msg() == "alpha beta gamma delta"


class _DigitsPrompt(ChatPrompt):
    def get_replacement_when_output(self) -> list[tuple[str, str]]:
        return [("two", "2")]


@pytest.mark.anyio
async def test_a_console_reply_shows_the_prompt_classs_output_replacement_and_keeps_the_models_text() -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000), chat_prompt_clazz=_DigitsPrompt)
    conversation = ConsoleConversation(chat_stream.service)
    shown = "".join([piece async for piece in conversation.reply("one two three")])
    assert shown == "one 2 three"
    assert conversation.prompt.get_responder_last_msg() == "one two three"
