"""Prompt classes over real HTTP: output replacements reach the client, the history keeps the
model's text, input replacements reach the model, and a class's stop strings stop every engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from starlette.applications import Starlette

from chatstream_asgi import AbstractChatPrompt, ChatPromptStockmarkGptNeoxJp, ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import MockEngine, OpenAIEngine

from .conftest import Outcomes, greedy_reply


class LinePrompt(AbstractChatPrompt):
    """`User: text\\nBot: text\\n` lines; subclasses set the replacement and stop strings."""

    output_pairs: list[tuple[str, str]] = []  # noqa: RUF012 - set per test on a fresh subclass
    stop: list[str] = []  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("User")
        self.set_responder("Bot")

    def get_replacement_when_input(self) -> list[tuple[str, str]]:
        return [("\n", "<NL>")]

    def get_replacement_when_output(self) -> list[tuple[str, str]]:
        return self.output_pairs

    def get_stop_strs(self) -> list[str]:
        return self.stop

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        return "".join(f"{c.role}: {c.message}\n" if c.message else f"{c.role}:" for c in self.get_contents(opts))


def prompt_class(output_pairs: list[tuple[str, str]] | None = None, stop: list[str] | None = None) -> type[LinePrompt]:
    return type("TestPrompt", (LinePrompt,), {"output_pairs": output_pairs or [], "stop": stop or []})


def raw_reply(model: Any, tokenizer: Any, prompt_text: str, max_new_tokens: int) -> str:
    """What the model itself generates, greedy, for `prompt_text`: the text before any shaping."""
    ids = tokenizer(prompt_text, add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    text: str = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text


def chat_once(serve: Any, chat_stream: ChatStream, user_input: str) -> tuple[str, AbstractChatPrompt]:
    """One turn over HTTP: the text the client got and the conversation the session kept."""
    outcomes = Outcomes()
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes))
    with server.client() as client:
        text = client.post("/chat_stream", json={"user_input": user_input}).text
    assert outcomes.wait(1) == ["success"]
    prompt: AbstractChatPrompt = outcomes.calls[0][0].state.session.get_session()["chat_prompt"]
    return text, prompt


def test_output_replacement_reaches_the_client_and_the_history_keeps_the_models_text(
    model: Any, tokenizer: Any, make_chat_stream: Any, serve: Any
) -> None:
    raw = raw_reply(model, tokenizer, "User: Hi\nBot:", 24).strip()
    assert len(raw) >= 6, raw
    target = raw[2:5]  # a text the model really produces, in the middle of its reply
    chat_stream = make_chat_stream(chat_prompt_clazz=prompt_class(output_pairs=[(target, "[*]")]))
    text, prompt = chat_once(serve, chat_stream, "Hi")
    assert text == raw.replace(target, "[*]")
    assert prompt.get_responder_last_msg() == raw


def test_reply_is_stripped_in_the_stream_and_in_the_history_as_chatstream_does(
    model: Any, tokenizer: Any, make_chat_stream: Any, serve: Any
) -> None:
    raw = raw_reply(model, tokenizer, "User: Hi\nBot:", 24)
    text, prompt = chat_once(serve, make_chat_stream(chat_prompt_clazz=prompt_class()), "Hi")
    assert text == raw.strip() and prompt.get_responder_last_msg() == raw.strip()


def test_input_replacement_is_what_the_model_and_the_history_see(
    model: Any, tokenizer: Any, make_chat_stream: Any, serve: Any
) -> None:
    raw = raw_reply(model, tokenizer, "User: Hi<NL>there\nBot:", 24)
    text, prompt = chat_once(serve, make_chat_stream(chat_prompt_clazz=prompt_class()), "Hi\nthere")
    assert prompt.get_requester_last_msg() == "Hi<NL>there"
    assert text == raw.strip()


@pytest.mark.parametrize("batching", [True, False])
def test_stop_strings_of_the_prompt_class_stop_the_local_engines(
    model: Any, tokenizer: Any, make_chat_stream: Any, serve: Any, batching: bool
) -> None:
    raw = raw_reply(model, tokenizer, "User: Hi\nBot:", 24).strip()
    stop = raw[4:7]
    chat_stream = make_chat_stream(chat_prompt_clazz=prompt_class(stop=[stop]), batching=batching)
    text, prompt = chat_once(serve, chat_stream, "Hi")
    assert text == raw[: raw.index(stop)].strip()
    assert stop not in (prompt.get_responder_last_msg() or "")


def test_stop_strings_and_output_replacement_apply_to_the_mock_engine(serve: Any) -> None:
    chat_stream = ChatStream(
        engine=MockEngine(tokens_per_second=1000),
        chat_prompt_clazz=prompt_class(output_pairs=[("<NL>", "\n")], stop=["STOP"]),
    )
    try:
        text, prompt = chat_once(serve, chat_stream, "one\ntwo STOP three")
    finally:
        chat_stream.close()
    assert text == "one\ntwo"  # echoed as "one<NL>two ", cut at the stop string, shown with its newline
    assert prompt.get_responder_last_msg() == "one<NL>two"


def test_stop_strings_of_the_prompt_class_stop_the_openai_engine(
    model: Any, tokenizer: Any, make_chat_stream: Any, serve: Any
) -> None:
    upstream = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(name="tiny"), openai=True))
    raw = greedy_reply(model, tokenizer, "Hi", 24).strip()  # the upstream renders its own chat template
    stop = raw[4:7]
    chat_stream = ChatStream(
        engine=OpenAIEngine(f"{upstream.url}/v1", model="tiny"),
        chat_prompt_clazz=prompt_class(stop=[stop]),
        temperature=0,
        max_new_tokens=24,
    )
    text, _ = chat_once(serve, chat_stream, "Hi")
    assert text == raw[: raw.index(stop)].strip()


def test_outside_chat_mode_the_reply_is_the_users_text_and_its_continuation(
    model: Any, tokenizer: Any, make_chat_stream: Any, serve: Any
) -> None:
    class Completion(ChatPromptStockmarkGptNeoxJp):
        def __init__(self) -> None:
            super().__init__()
            self.set_chat_mode_enabled(False)

    raw = raw_reply(model, tokenizer, "Once upon", 24)
    text, prompt = chat_once(serve, make_chat_stream(chat_prompt_clazz=Completion), "Once upon")
    assert text == ("Once upon" + raw).strip()
    assert prompt.get_responder_last_msg() == text


def test_get_history_shows_the_conversation_in_peoples_spelling(serve: Any) -> None:
    chat_stream = ChatStream(
        engine=MockEngine(tokens_per_second=1000), chat_prompt_clazz=prompt_class([("<NL>", "\n")])
    )
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, apis={"include": ["get_history"]})
    try:
        with serve(app).client() as client:
            assert client.post("/chat_stream", json={"user_input": "one\ntwo"}).text == "one\ntwo"
            messages = client.get("/get_history").json()["messages"]
    finally:
        chat_stream.close()
    assert [(m["role"], m["content"]) for m in messages] == [("user", "one\ntwo"), ("assistant", "one\ntwo")]
