"""ChatStream's module path for prompt names: `from chatstream_asgi.chat_prompt import AbstractChatPrompt, PromptTTL`.

The classes live in `chatstream_asgi.core.prompt` and `chatstream_asgi.chat_prompt_presets`; this
module only gives them the import path ChatStream code uses (`chatstream.chat_prompt`).
"""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets.chat_prompt_cyberagent_opencalm import ChatPromptCyberAgentOpenCalm
from chatstream_asgi.chat_prompt_presets.chat_prompt_databricks_dolly import ChatPromptDatabricksDolly
from chatstream_asgi.chat_prompt_presets.chat_prompt_linecorp_gpt_neox import ChatPromptLineCorpJpLargeLmInstSft
from chatstream_asgi.chat_prompt_presets.chat_prompt_matsuolab_gpt_neox import ChatPromptMatsuoLabJpGptNeoxInstSft
from chatstream_asgi.chat_prompt_presets.chat_prompt_metallama_llama2 import ChatPromptMetaLlamaLlama2Chat
from chatstream_asgi.chat_prompt_presets.chat_prompt_mosaicml_mpt_chat import ChatPromptMosaicmlMptChat
from chatstream_asgi.chat_prompt_presets.chat_prompt_openlmresearch_open_llama import ChatPromptOpenlmrOpenLlama
from chatstream_asgi.chat_prompt_presets.chat_prompt_rinna_gpt_neox import (
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptRinnaJpGptNeoxInstSft,
)
from chatstream_asgi.chat_prompt_presets.chat_prompt_stabilityai_gpt_neox import ChatPromptStabilityAiJpGptNeoxInstSft
from chatstream_asgi.chat_prompt_presets.chat_prompt_stockmark_gpt_neox import ChatPromptStockmarkGptNeoxJp
from chatstream_asgi.chat_prompt_presets.chat_prompt_togethercomputer_redpajama_incite import (
    ChatPromptTogetherRedPajamaINCITEChat,
)
from chatstream_asgi.core.prompt import AbstractChatPrompt, ChatContent, ChatPrompt, PromptTTL, RoleType

__all__ = [
    "AbstractChatPrompt",
    "ChatContent",
    "ChatPrompt",
    "PromptTTL",
    "RoleType",
    "ChatPromptCyberAgentOpenCalm",
    "ChatPromptDatabricksDolly",
    "ChatPromptLineCorpJpLargeLmInstSft",
    "ChatPromptMatsuoLabJpGptNeoxInstSft",
    "ChatPromptMetaLlamaLlama2Chat",
    "ChatPromptMosaicmlMptChat",
    "ChatPromptOpenlmrOpenLlama",
    "ChatPromptRinnaJapaneseGPTNeoxInst",
    "ChatPromptRinnaJpGptNeoxInstSft",
    "ChatPromptStabilityAiJpGptNeoxInstSft",
    "ChatPromptStockmarkGptNeoxJp",
    "ChatPromptTogetherRedPajamaINCITEChat",
]
