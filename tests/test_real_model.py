"""The real model people judge the package by, SmolLM2-135M-Instruct, where it proves something a
random-weight model cannot: a real tokenizer's reply re-tokenizes as it was generated, a chat
template with a default system prompt, replies that end by themselves, words a stop string can
match. Each reply is checked against `model.generate` itself, greedy, on the same conversation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from openai import OpenAI
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware

from .conftest import LiveServer, wait_until
from .test_webui import browser, contents, messages, open_page, send, server_history, wait_for_replies

__all__ = ["browser", "open_page"]  # the chat page's fixtures, used here as pytest fixtures

MAX_NEW_TOKENS = 24


def reference_reply(smollm2: tuple[Any, Any], messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """What `model.generate` replies, greedy, to `messages`."""
    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    reply: str = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return reply


@pytest.fixture
def real_server(smollm2: tuple[Any, Any], serve: Any) -> Iterator[Any]:
    made: list[ChatStream] = []

    def start(**options: Any) -> LiveServer:
        model, tokenizer = smollm2
        options.setdefault("temperature", 0)
        options.setdefault("max_new_tokens", MAX_NEW_TOKENS)
        chat_stream = ChatStream(model=model, tokenizer=tokenizer, device="cpu", **options)
        made.append(chat_stream)
        assert wait_until(lambda: chat_stream.ready)
        app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, openai=True, webui=True)
        server: LiveServer = serve(app)
        return server

    yield start
    for chat_stream in made:
        chat_stream.close()


def test_the_real_model_answers_a_question_as_model_generate_does(real_server: Any, smollm2: tuple[Any, Any]) -> None:
    server = real_server()
    with server.client() as client:
        reply = client.post("/chat_stream", json={"user_input": "What is the capital of France?"}).text
    assert reply == reference_reply(smollm2, [{"role": "user", "content": "What is the capital of France?"}], 24)
    assert "Paris" in reply


def test_a_conversation_of_several_turns_through_v1_replies_as_model_generate_at_each_turn(
    real_server: Any, smollm2: tuple[Any, Any]
) -> None:
    server = real_server()
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages: list[dict[str, str]] = []
    for question in ("Name a colour of the sky.", "And the colour of grass?", "Which of the two did you name first?"):
        messages.append({"role": "user", "content": question})
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, stream=True, temperature=0, max_tokens=MAX_NEW_TOKENS
        )
        reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert reply == reference_reply(smollm2, messages, MAX_NEW_TOKENS)
        messages.append({"role": "assistant", "content": reply})


def test_a_conversation_of_several_turns_through_chat_stream_keeps_its_history_on_the_server(
    real_server: Any, smollm2: tuple[Any, Any]
) -> None:
    server = real_server()
    messages: list[dict[str, str]] = []
    with server.client() as client:
        for question in ("Hi! Who are you?", "Say that in fewer words.", "Thanks. Now say goodbye."):
            reply = client.post("/chat_stream", json={"user_input": question}).text
            messages += [{"role": "user", "content": question}]
            assert reply == reference_reply(smollm2, messages, MAX_NEW_TOKENS)
            messages += [{"role": "assistant", "content": reply}]
        history = client.get("/get_history").json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [(m["role"], m["content"]) for m in messages]


def test_a_conversation_of_several_turns_on_the_chat_page_shows_what_the_model_wrote(
    real_server: Any, smollm2: tuple[Any, Any], open_page: Any
) -> None:
    server = real_server()
    page = open_page(server.url)
    questions = ("What is the capital of France?", "And of Italy?", "Which of the two is further south?")
    expected: list[dict[str, str]] = []
    for turn, question in enumerate(questions, start=1):
        send(page, question)
        wait_for_replies(page, turn)
        expected.append({"role": "user", "content": question})
        expected.append({"role": "assistant", "content": reference_reply(smollm2, expected, MAX_NEW_TOKENS)})
    assert contents(server_history(page)) == [(m["role"], m["content"]) for m in expected]

    def words(text: str) -> list[str]:  # markdown rendering may change spacing and drop markup
        return text.replace("*", "").replace("`", "").split()

    shown = messages(page)
    assert [role for role, _ in shown] == [m["role"] for m in expected]
    assert [words(text) for _, text in shown] == [words(m["content"]) for m in expected]


def test_a_stop_string_ends_the_reply_just_before_it(real_server: Any) -> None:
    server = real_server()
    question = {"user_input": "What is the capital of France?"}
    with server.client() as client:
        whole = client.post("/chat_stream", json=question).text
        client.post("/clear_context")
        stopped = client.post("/chat_stream", json={**question, "stop": ["Paris"]}).text
    assert "Paris" in whole
    assert stopped == whole[: whole.index("Paris")]


def test_regenerate_replies_anew_to_the_conversation_without_the_old_reply(
    real_server: Any, smollm2: tuple[Any, Any]
) -> None:
    server = real_server()
    question = "Tell me a fun fact."
    with server.client() as client:
        sampled = client.post("/chat_stream", json={"user_input": question, "temperature": 1.0}).text
        again = client.post("/chat_stream", json={"regenerate": True}).text  # greedy, the server's default here
        history = client.get("/get_history").json()["messages"]
    # Greedy from the conversation as it was before the first reply: the old reply is gone from the prompt.
    assert again == reference_reply(smollm2, [{"role": "user", "content": question}], MAX_NEW_TOKENS)
    assert [(m["role"], m["content"]) for m in history] == [("user", question), ("assistant", again)]
    assert sampled  # a reply was there to replace


class PrefillCounter:
    """Counts the prompt tokens the model is run on (forward passes of more than one token)."""

    def __init__(self, model: Any) -> None:
        self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            self.tokens += int(ids.shape[1])

    def remove(self) -> None:
        self._handle.remove()


def test_the_conversation_cache_gives_the_same_greedy_replies_and_prefills_less(
    real_server: Any, smollm2: tuple[Any, Any]
) -> None:
    questions = ("Give me a word that rhymes with cat.", "Another one?", "Use both in a sentence.")
    runs: dict[str, tuple[list[str], list[int]]] = {}
    for label, cache_bytes in (("cached", 256 << 20), ("uncached", 0)):
        server = real_server(conversation_cache_bytes=cache_bytes)
        counter = PrefillCounter(smollm2[0])
        replies, prefilled = [], []
        try:
            with server.client() as client:
                for question in questions:
                    counter.tokens = 0
                    response = client.post("/chat_stream?format=sse", json={"user_input": question})
                    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
                    replies.append("".join(event.get("delta", "") for event in events))
                    prefilled.append(counter.tokens)
        finally:
            counter.remove()
        runs[label] = (replies, prefilled)
    assert runs["cached"][0] == runs["uncached"][0]
    cached, uncached = runs["cached"][1], runs["uncached"][1]
    assert cached[0] == uncached[0]  # nothing to reuse on the first turn
    assert all(c < u for c, u in zip(cached[1:], uncached[1:], strict=True)), (cached, uncached)
