"""ChatStream's AbstractChatPrompt API: live message lists, removal, TTL, chat mode, replacements,
stop-string prefixes, skip lengths, and histories stored by earlier versions."""

from __future__ import annotations

from typing import Any

import pytest

from chatstream_asgi import (
    AbstractChatPrompt,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptRinnaJpGptNeoxInstSft,
    ChatPromptTogetherRedPajamaINCITEChat,
    PromptTTL,
    RoleType,
)
from chatstream_asgi.chat_prompt import ChatContent


class LinePrompt(AbstractChatPrompt):
    """`User: text\\nBot: text\\n` lines, with Rinna's input replacement."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("User")
        self.set_responder("Bot")

    def get_replacement_when_input(self) -> list[tuple[str, str]]:
        return [("\n", "<NL>"), ("<NL><NL>", "<P>")]

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        contents = self.get_contents(opts)
        return self.system + "".join(
            f"{c.role}: {c.message}\n" if c.message else f"{c.role}:" for c in contents if c.role
        )


def chat(*messages: str | None) -> LinePrompt:
    prompt = LinePrompt()
    for index, message in enumerate(messages):
        (prompt.add_requester_msg if index % 2 == 0 else prompt.add_responder_msg)(message)
    return prompt


def test_requester_and_responder_messages_are_live_lists_of_the_same_messages() -> None:
    prompt = chat("Hi", "Hello")
    prompt.responder_messages[-1].set_message("Changed")
    assert prompt.chat_contents[-1].get_message() == "Changed"
    prompt.add_requester_msg("More")
    assert [c.message for c in prompt.requester_messages] == ["Hi", "More"]
    assert prompt.requester_messages[-1] is prompt.chat_contents[-1]


def test_lists_stay_live_after_a_to_dict_round_trip() -> None:
    prompt = LinePrompt.from_dict(chat("Hi", "Hello").to_dict())
    prompt.set_responder_last_msg("Changed")
    assert prompt.responder_messages[-1] is prompt.chat_contents[-1]
    assert prompt.create_prompt() == "User: Hi\nBot: Changed\n"


def test_input_replacements_apply_to_user_messages_pair_by_pair_and_not_to_replies() -> None:
    prompt = chat("a\n\nb", "c\nd")
    assert prompt.get_requester_last_msg() == "a<P>b"
    assert prompt.get_responder_last_msg() == "c\nd"


def test_remove_last_requester_msg_removes_it_from_both_lists() -> None:
    prompt = chat("Hi", "Hello", "More")
    prompt.remove_last_requester_msg()
    assert [c.message for c in prompt.chat_contents] == ["Hi", "Hello"]
    assert prompt.get_turn() == 1


def test_remove_last_responder_msg_removes_it_from_both_lists() -> None:
    prompt = chat("Hi", "Hello")
    prompt.remove_last_responder_msg()
    assert prompt.get_responder_last_msg() is None and len(prompt.chat_contents) == 1


def test_removing_a_message_of_the_wrong_role_is_refused() -> None:
    with pytest.raises(ValueError, match="user"):
        chat("Hi", "Hello").remove_last_requester_msg()
    with pytest.raises(ValueError, match="assistant"):
        chat("Hi").remove_last_responder_msg()
    with pytest.raises(ValueError, match="assistant"):
        chat().remove_last_responder_msg()


def test_clearing_the_last_reply_never_touches_a_request_when_role_names_are_empty() -> None:
    prompt = ChatPromptMetaLlamaLlama2Chat()  # requester and responder are both ""
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg("Hello")
    prompt.add_requester_msg("More")
    prompt.clear_last_responder_message()
    assert prompt.get_requester_last_msg() == "More" and prompt.get_responder_last_msg() == "Hello"


def test_single_turn_ttl_renders_only_the_newest_exchange() -> None:
    prompt = chat("Hi", "Hello", "More", None)
    prompt.set_prompt_ttl(PromptTTL.SINGLE_TURN)
    assert prompt.create_prompt() == "User: More\nBot:"
    prompt.set_prompt_ttl(PromptTTL.MULTI_TURN)
    assert prompt.create_prompt() == "User: Hi\nBot: Hello\nUser: More\nBot:"


def test_history_cut_at_a_message_id_ignores_the_ttl_as_chatstream_does() -> None:
    prompt = chat("Hi", "Hello", "More", "Sure")
    prompt.responder_messages[0].set_message_id("m1")
    prompt.set_prompt_ttl(PromptTTL.SINGLE_TURN)
    assert prompt.create_prompt({"to_message_id": "m1"}) == "User: Hi\nBot: Hello\n"


def test_omit_last_message_renders_the_newest_message_as_pending() -> None:
    prompt = chat("Hi", "Hello")
    assert prompt.create_prompt({"omit_last_message": True}) == "User: Hi\nBot:"


def test_chat_mode_off_drops_the_class_stop_strings() -> None:
    prompt = ChatPromptTogetherRedPajamaINCITEChat()
    assert prompt.is_chat_mode_enabled() and prompt.generation_stop_strs() == ["<human>:", "<|endoftext|>"]
    prompt.set_chat_mode_enabled(False)
    assert not prompt.is_chat_mode_enabled() and prompt.generation_stop_strs() == []


def test_prefix_as_stop_str_is_the_text_that_opens_a_user_turn_and_clears_the_history() -> None:
    prompt = chat("Hi", "Hello")
    prompt.set_system("Intro\n")
    prompt.set_prefix_as_stop_str_enabled(True)
    assert prompt.is_empty()
    assert prompt.generation_stop_strs() == ["User:"]


def test_prefix_as_stop_str_needs_a_user_turn_that_renders() -> None:
    class Roleless(LinePrompt):
        def __init__(self) -> None:
            super().__init__()
            self.set_requester("")

    with pytest.raises(ValueError, match="set_requester"):
        Roleless().set_prefix_as_stop_str_enabled(True)


def test_skip_len_counts_the_prompt_without_special_tokens(tokenizer: Any) -> None:
    prompt = chat("Hi<|endoftext|>", "Hello")
    prompt.set_tokenizer(tokenizer)
    assert prompt.get_skip_len() == len("User: Hi\nBot: Hello\n")
    assert prompt.get_skip_len(omit_last_message=True) == len("User: Hi\nBot:")


def test_llama2_skip_len_grows_by_one_per_turn_from_the_second_on() -> None:
    prompt = ChatPromptMetaLlamaLlama2Chat()
    prompt.add_requester_msg("Hi")
    one_turn = prompt.get_skip_len()
    assert one_turn == len(prompt.create_prompt())
    prompt.add_responder_msg("Hello")
    prompt.add_requester_msg("More")
    assert prompt.get_skip_len() == len(prompt.create_prompt()) + 2


def test_child_messages_are_kept_and_serialized_in_chatstreams_shape() -> None:
    prompt = LinePrompt()
    prompt.add_requester_msg("Compare", child_messages=["A", "B"])
    content = prompt.chat_contents[0]
    assert content.has_child_messages() and content.get_child_messages() == ["A", "B"]
    data = prompt.to_dict()
    assert data["chat_contents"][0] == {
        "role": "User",
        "role_type": "REQUESTER",
        "message": "Compare",
        "message_id": None,
        "child_messages": ["A", "B"],
    }
    assert data["requester_messages"] == data["chat_contents"] and data["responder_messages"] == []
    assert set(data) == {"system", "chat_contents", "responder_messages", "requester_messages",
                         "requester", "responder", "chat_mode"}  # fmt: skip


def test_child_message_and_child_messages_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        LinePrompt().add_requester_msg("x", child_message="a", child_messages=["b"])
    with pytest.raises(ValueError, match="non-empty list"):
        LinePrompt().add_requester_msg("x", child_messages=[])


def test_a_history_stored_by_the_previous_version_still_loads() -> None:
    stored = {  # what sessions held before child_messages existed
        "system": "",
        "chat_contents": [
            {"role": "User", "role_type": "REQUESTER", "message": "Hi", "message_id": None},
            {"role": "Bot", "role_type": "RESPONDER", "message": "Hello", "message_id": "m1"},
        ],
        "responder_messages": [{"role": "Bot", "role_type": "RESPONDER", "message": "Hello", "message_id": "m1"}],
        "requester_messages": [{"role": "User", "role_type": "REQUESTER", "message": "Hi", "message_id": None}],
        "requester": "User",
        "responder": "Bot",
        "chat_mode": True,
    }
    prompt = LinePrompt.from_dict(stored)
    assert prompt.create_prompt() == "User: Hi\nBot: Hello\n"
    assert prompt.find_chat_content_by_message_id("m1") is prompt.responder_messages[0]
    assert prompt.get_requester_last_msg() == "Hi"  # loaded as stored: input replacements are not applied twice


def test_messages_without_an_id_are_never_found_by_id() -> None:
    assert chat("Hi", "Hello").find_chat_content_by_message_id(None) is None  # type: ignore[arg-type]


def test_turns_roles_and_emptiness_read_as_in_chatstream() -> None:
    prompt = chat("Hi", "Hello", "More")
    assert prompt.get_turn() == 2 and not prompt.is_empty()
    assert prompt.is_requester_role("User") and not prompt.is_requester_role("Bot")
    assert prompt.chat_contents[0].get_role_type() is RoleType.REQUESTER
    prompt.clear_history()
    assert prompt.is_empty() and prompt.requester_messages == [] and prompt.responder_messages == []


def test_rinna_output_replacement_is_declared_for_the_stream() -> None:
    prompt = ChatPromptRinnaJpGptNeoxInstSft()
    assert prompt.get_replacement_when_output() == [("<NL>", "\n")]
    assert ChatContent("x").get_child_messages() is None
