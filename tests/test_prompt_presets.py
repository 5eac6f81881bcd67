"""ChatStream's bundled prompt classes render exactly what ChatStream 0.3.0 renders.

Each expected string was derived from ChatStream's preset code (and checked once against its
classes); the conversation: a system text, a two-line first request, a reply, a second request
with a child text, and the reply pending.
"""

from __future__ import annotations

import importlib

import pytest

import chatstream_asgi
from chatstream_asgi import AbstractChatPrompt

LLAMA2_SYSTEM = (
    "<s>[INST] <<SYS>>\n"
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.\n"
    "<</SYS>>\n\n"
)
JA_INSTRUCTION = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
)
DOLLY = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"

# ChatStream 0.3.0's module of each preset: the import path its users have.
MODULES = {
    "ChatPromptTogetherRedPajamaINCITEChat": "chat_prompt_togethercomputer_redpajama_incite",
    "ChatPromptRinnaJpGptNeoxInstSft": "chat_prompt_rinna_gpt_neox",
    "ChatPromptCyberAgentOpenCalm": "chat_prompt_cyberagent_opencalm",
    "ChatPromptMetaLlamaLlama2Chat": "chat_prompt_metallama_llama2",
    "ChatPromptOpenlmrOpenLlama": "chat_prompt_openlmresearch_open_llama",
    "ChatPromptStabilityAiJpGptNeoxInstSft": "chat_prompt_stabilityai_gpt_neox",
    "ChatPromptStockmarkGptNeoxJp": "chat_prompt_stockmark_gpt_neox",
    "ChatPromptLineCorpJpLargeLmInstSft": "chat_prompt_linecorp_gpt_neox",
    "ChatPromptMatsuoLabJpGptNeoxInstSft": "chat_prompt_matsuolab_gpt_neox",
    "ChatPromptMosaicmlMptChat": "chat_prompt_mosaicml_mpt_chat",
    "ChatPromptDatabricksDolly": "chat_prompt_databricks_dolly",
}


def conversation(name: str) -> AbstractChatPrompt:
    """The known conversation, its reply pending, in preset `name`."""
    prompt: AbstractChatPrompt = getattr(chatstream_asgi, name)()
    if not prompt.system:  # presets with a system text of their own keep it
        prompt.set_system("You chat. ")
    prompt.add_requester_msg("Hi\nthere")
    prompt.add_responder_msg("Hello!")
    prompt.add_requester_msg("Second", child_message="extra")
    prompt.add_responder_msg(None)
    return prompt


def test_redpajama_renders_human_and_bot_lines() -> None:
    expected = "You chat. <human>: Hi\nthere\n<bot>: Hello!\n<human>: Second\n<bot>:"
    assert conversation("ChatPromptTogetherRedPajamaINCITEChat").create_prompt() == expected


def test_rinna_renders_nl_tokens_and_replaces_newlines_in_user_text() -> None:
    expected = "You chat. ユーザー: Hi<NL>there<NL>システム: Hello!<NL>ユーザー: Second<NL>システム: "
    assert conversation("ChatPromptRinnaJpGptNeoxInstSft").create_prompt() == expected


def test_opencalm_joins_the_texts_and_a_pending_reply_adds_nothing() -> None:
    # ChatStream renders "You chat. Hi\nthereHello!SecondSecond" here: its loop re-adds the
    # previous message for the pending reply. The request is sent to the model once.
    assert conversation("ChatPromptCyberAgentOpenCalm").create_prompt() == "You chat. Hi\nthereHello!Second"


def test_llama2_renders_inst_blocks_after_its_default_system_block() -> None:
    expected = LLAMA2_SYSTEM + "Hi\nthere [/INST] Hello! </s><s>[INST] Second [/INST] "
    assert conversation("ChatPromptMetaLlamaLlama2Chat").create_prompt() == expected


def test_open_llama_renders_a_question_and_answer_transcript() -> None:
    expected = "You chat. Q: Hi\nthere\nA: Hello!\nQ: Second\nA:"
    assert conversation("ChatPromptOpenlmrOpenLlama").create_prompt() == expected


def test_stabilityai_renders_every_instruction_block_with_its_input() -> None:
    expected = (
        JA_INSTRUCTION + "### 指示: \nHi\nthere\n\n### 応答: \nHello!\n\n"
        "### 指示: \nSecond\n\n### 入力: \nextra\n\n### 応答: "
    )
    assert conversation("ChatPromptStabilityAiJpGptNeoxInstSft").create_prompt() == expected


def test_stockmark_joins_the_texts_and_a_pending_reply_adds_nothing() -> None:
    # As for OpenCALM, ChatStream repeats "Second" here.
    assert conversation("ChatPromptStockmarkGptNeoxJp").create_prompt() == "You chat. Hi\nthereHello!Second"


def test_linecorp_ends_user_lines_with_a_newline_and_replies_without() -> None:
    expected = "You chat. ユーザー: Hi\nthere\nシステム: Hello!ユーザー: Second\nシステム: "
    assert conversation("ChatPromptLineCorpJpLargeLmInstSft").create_prompt() == expected


def test_matsuolab_renders_only_the_newest_instruction() -> None:
    expected = JA_INSTRUCTION + "### 指示: \nSecond\n\n### 入力: \nextra\n\n### 応答: "
    assert conversation("ChatPromptMatsuoLabJpGptNeoxInstSft").create_prompt() == expected


def test_mpt_renders_human_and_bot_lines() -> None:
    expected = "You chat. <human>: Hi\nthere\n<bot>: Hello!\n<human>: Second\n<bot>:"
    assert conversation("ChatPromptMosaicmlMptChat").create_prompt() == expected


def test_dolly_renders_instruction_and_response_blocks() -> None:
    expected = (
        DOLLY + "### Instruction:\nHi\nthere\n\n### Response:\nHello!\n\n### Instruction:\nSecond\n\n### Response:\n"
    )
    assert conversation("ChatPromptDatabricksDolly").create_prompt() == expected


@pytest.mark.parametrize(
    ("name", "stop_strs"),
    [
        ("ChatPromptTogetherRedPajamaINCITEChat", ["<human>:", "<|endoftext|>"]),
        ("ChatPromptRinnaJpGptNeoxInstSft", []),
        ("ChatPromptCyberAgentOpenCalm", []),
        ("ChatPromptMetaLlamaLlama2Chat", []),
        ("ChatPromptOpenlmrOpenLlama", ["\nQ:", "\nB:", "\nC:"]),
        ("ChatPromptStabilityAiJpGptNeoxInstSft", ["### 指示: "]),
        ("ChatPromptStockmarkGptNeoxJp", []),
        ("ChatPromptLineCorpJpLargeLmInstSft", ["ユーザー: "]),
        ("ChatPromptMatsuoLabJpGptNeoxInstSft", ["### 指示: ", "Q:"]),
        ("ChatPromptMosaicmlMptChat", ["<human>:"]),
        ("ChatPromptDatabricksDolly", ["### Instruction:\n"]),
    ],
)
def test_each_preset_gives_the_engines_chatstreams_stop_strings(name: str, stop_strs: list[str]) -> None:
    assert conversation(name).generation_stop_strs() == stop_strs


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_preset_is_importable_from_chatstreams_module_paths(name: str) -> None:
    preset = getattr(chatstream_asgi, name)
    module = importlib.import_module(f"chatstream_asgi.chat_prompt_presets.{MODULES[name]}")
    assert getattr(module, name) is preset
    assert getattr(importlib.import_module("chatstream_asgi.chat_prompt"), name) is preset
    assert issubclass(preset, AbstractChatPrompt)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_preset_renders_the_same_after_a_to_dict_round_trip(name: str) -> None:
    prompt = conversation(name)
    restored = type(prompt).from_dict(prompt.to_dict())
    assert restored.create_prompt() == prompt.create_prompt()
    assert restored.generation_stop_strs() == prompt.generation_stop_strs()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_preset_outside_chat_mode_sends_the_newest_text_alone_without_stop_strings(name: str) -> None:
    prompt = conversation(name)
    prompt.set_chat_mode_enabled(False)
    assert prompt.create_prompt() == "Second"
    assert prompt.generation_stop_strs() == []


def test_the_documented_rinna_class_name_is_the_rinna_preset() -> None:
    assert chatstream_asgi.ChatPromptRinnaJapaneseGPTNeoxInst is chatstream_asgi.ChatPromptRinnaJpGptNeoxInstSft
