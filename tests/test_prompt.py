"""ChatPrompt: ChatStream's conversation API, chat-template rendering, truncation."""

from __future__ import annotations

from typing import Any

from chatstream_asgi import AbstractChatPrompt, ChatPrompt
from chatstream_asgi.core.prompt import fit_prompt


def _prompt(tokenizer: Any) -> ChatPrompt:
    prompt = ChatPrompt()
    prompt.set_tokenizer(tokenizer)
    return prompt


def test_new_prompt_is_empty_and_has_nothing_to_regenerate(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    assert prompt.is_empty()
    assert not prompt.has_reply_to_regenerate()
    assert prompt.get_requester_last_msg() is None


def test_pending_reply_renders_with_the_generation_cue(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == "<|user|>Hi<|end|>\n<|assistant|>"


def test_finished_conversation_renders_in_full(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    prompt.set_system("Be brief.")
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg("Hello!")
    assert prompt.create_prompt() == "<|system|>Be brief.<|end|>\n<|user|>Hi<|end|>\n<|assistant|>Hello!<|end|>\n"


def test_clear_last_responder_message_makes_the_reply_pending_again(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg("Hello!")
    prompt.clear_last_responder_message()
    assert prompt.get_responder_last_msg() is None
    assert prompt.create_prompt().endswith("<|assistant|>")
    assert prompt.get_requester_last_msg() == "Hi"


def test_to_dict_round_trip_keeps_chatstreams_shape(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg("Hello!")
    prompt.set_responder_last_msg_id("m1")
    data = prompt.to_dict()
    assert set(data) >= {
        "system",
        "chat_contents",
        "requester_messages",
        "responder_messages",
        "requester",
        "responder",
    }
    restored = ChatPrompt.from_dict(data)
    restored.set_tokenizer(tokenizer)
    assert restored.to_dict() == data
    assert restored.find_chat_content_by_message_id("m1") is not None


def test_clone_is_independent(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    prompt.add_requester_msg("Hi")
    twin = prompt.clone()
    twin.add_responder_msg("Hello")
    assert prompt.get_responder_last_msg() is None
    assert twin.tokenizer is tokenizer


def test_long_history_is_cut_oldest_turn_first(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    for turn in range(20):
        prompt.add_requester_msg(f"question number {turn} " * 5)
        prompt.add_responder_msg(f"answer number {turn} " * 5)
    prompt.add_requester_msg("the newest question")
    prompt.add_responder_msg(None)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = count(prompt.create_prompt())
    text = fit_prompt(prompt, count, budget=full // 3)
    assert count(text) <= full // 3
    assert "the newest question" in text and text.endswith("<|assistant|>")
    assert "question number 0 " not in text and "question number 19 " in text


def test_newest_request_is_kept_even_when_it_alone_is_over_budget(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    prompt.add_requester_msg("old")
    prompt.add_responder_msg("reply")
    prompt.add_requester_msg("very long " * 50)
    prompt.add_responder_msg(None)
    text = fit_prompt(prompt, lambda t: len(t), budget=10)
    assert prompt.get_turn() == 1 and "very long" in text


def test_chatstream_style_prompt_class_renders_its_own_format() -> None:
    class RolePlayPrompt(AbstractChatPrompt):
        def __init__(self) -> None:
            super().__init__()
            self.set_requester("User")
            self.set_responder("Bot")

        def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
            lines = [f"{c.get_role()}: {c.get_message() or ''}" for c in self.get_contents(opts)]
            return "\n".join(lines)

        def get_stop_strs(self) -> list[str]:
            return ["\nUser:"]

    prompt = RolePlayPrompt()
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == "User: Hi\nBot: "
    assert RolePlayPrompt.from_dict(prompt.to_dict()).create_prompt() == "User: Hi\nBot: "


def test_chat_prompt_without_a_tokenizer_renders_a_plain_transcript() -> None:
    prompt = ChatPrompt()
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == "<|user|>Hi<|end|>\n<|assistant|>"


def test_openai_messages_round_trip_with_the_reply_pending(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More"},
    ]
    prompt = ChatPrompt.from_messages(messages)
    prompt.set_tokenizer(tokenizer)
    assert prompt.to_messages() == messages
    assert prompt.create_prompt() == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.get_turn() == 2 and prompt.drop_oldest_turn() and prompt.to_messages()[1:] == messages[3:]


def test_fitting_a_long_history_tokenizes_about_one_context_not_the_whole_history(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    turn_text = "a long turn of many words " * 40  # about a thousand characters a message
    for _ in range(200):
        prompt.add_requester_msg(turn_text)
        prompt.add_responder_msg(turn_text)
    prompt.add_requester_msg("the newest question")
    prompt.add_responder_msg(None)
    history_chars = len(turn_text) * 400
    counted = 0

    def count(text: str) -> int:
        nonlocal counted
        counted += len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    budget = count(turn_text) * 6  # room for a few turns
    counted = 0
    text = fit_prompt(prompt, count, budget)
    assert count(text) <= budget and "the newest question" in text
    assert counted < 4 * len(text) + 4 * len(turn_text)  # proportional to what fits, not to the history
    assert counted < history_chars / 10


def test_the_window_kept_is_as_large_as_fits_within_one_turn(tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    for turn in range(30):
        prompt.add_requester_msg(f"question {turn} " * 8)
        prompt.add_responder_msg(f"answer {turn} " * 8)
    prompt.add_requester_msg("newest")
    prompt.add_responder_msg(None)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    budget = count(prompt.create_prompt()) // 2
    reference = prompt.clone()
    while count(reference.create_prompt()) > budget and reference.drop_oldest_turn():
        pass  # the old algorithm: the largest window that fits
    text = fit_prompt(prompt, count, budget)
    assert count(text) <= budget
    assert reference.get_turn() - 1 <= prompt.get_turn() <= reference.get_turn()
