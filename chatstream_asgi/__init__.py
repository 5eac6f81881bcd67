"""chatstream-asgi: a production streaming-chat server for LLMs, as a pure-ASGI middleware.

Names are imported on first use, so `chatstream-asgi serve` can tune the process (OpenMP's
spin-wait) before torch loads, and `import chatstream_asgi` itself stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatstream_asgi.asgi.middleware import ChatStreamMiddleware
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
    from chatstream_asgi.chat_prompt_presets.chat_prompt_stabilityai_gpt_neox import (
        ChatPromptStabilityAiJpGptNeoxInstSft,
    )
    from chatstream_asgi.chat_prompt_presets.chat_prompt_stockmark_gpt_neox import ChatPromptStockmarkGptNeoxJp
    from chatstream_asgi.chat_prompt_presets.chat_prompt_togethercomputer_redpajama_incite import (
        ChatPromptTogetherRedPajamaINCITEChat,
    )
    from chatstream_asgi.compat.chat_stream import ChatStream
    from chatstream_asgi.core.params import GenerationParams
    from chatstream_asgi.core.prompt import AbstractChatPrompt, ChatContent, ChatPrompt, PromptTTL, RoleType
    from chatstream_asgi.errors import ChatStreamError
    from chatstream_asgi.outcomes import (
        CLIENT_DISCONNECTED_BEFORE_STREAMING,
        CLIENT_DISCONNECTED_WHILE_STREAMING,
        SUCCESS,
        UNKNOWN_ERROR_OCCURRED,
    )
    from chatstream_asgi.runtime.admission import Admission, Load
    from chatstream_asgi.sessions.memory import MemoryStore
    from chatstream_asgi.sessions.redis_store import RedisStore
    from chatstream_asgi.sessions.session import Session
    from chatstream_asgi.sessions.store import SessionStore

__version__ = "0.1.0"

_HOMES = {
    "Admission": "runtime.admission",
    "Load": "runtime.admission",
    "ChatStream": "compat.chat_stream",
    "ChatStreamError": "errors",
    "ChatStreamMiddleware": "asgi.middleware",
    "GenerationParams": "core.params",
    "AbstractChatPrompt": "core.prompt",
    "ChatContent": "core.prompt",
    "ChatPrompt": "core.prompt",
    "RoleType": "core.prompt",
    "PromptTTL": "core.prompt",
    "ChatPromptCyberAgentOpenCalm": "chat_prompt_presets.chat_prompt_cyberagent_opencalm",
    "ChatPromptDatabricksDolly": "chat_prompt_presets.chat_prompt_databricks_dolly",
    "ChatPromptLineCorpJpLargeLmInstSft": "chat_prompt_presets.chat_prompt_linecorp_gpt_neox",
    "ChatPromptMatsuoLabJpGptNeoxInstSft": "chat_prompt_presets.chat_prompt_matsuolab_gpt_neox",
    "ChatPromptMetaLlamaLlama2Chat": "chat_prompt_presets.chat_prompt_metallama_llama2",
    "ChatPromptMosaicmlMptChat": "chat_prompt_presets.chat_prompt_mosaicml_mpt_chat",
    "ChatPromptOpenlmrOpenLlama": "chat_prompt_presets.chat_prompt_openlmresearch_open_llama",
    "ChatPromptRinnaJapaneseGPTNeoxInst": "chat_prompt_presets.chat_prompt_rinna_gpt_neox",
    "ChatPromptRinnaJpGptNeoxInstSft": "chat_prompt_presets.chat_prompt_rinna_gpt_neox",
    "ChatPromptStabilityAiJpGptNeoxInstSft": "chat_prompt_presets.chat_prompt_stabilityai_gpt_neox",
    "ChatPromptStockmarkGptNeoxJp": "chat_prompt_presets.chat_prompt_stockmark_gpt_neox",
    "ChatPromptTogetherRedPajamaINCITEChat": "chat_prompt_presets.chat_prompt_togethercomputer_redpajama_incite",
    "RedisStore": "sessions.redis_store",
    "MemoryStore": "sessions.memory",
    "Session": "sessions.session",
    "SessionStore": "sessions.store",
    "CLIENT_DISCONNECTED_BEFORE_STREAMING": "outcomes",
    "CLIENT_DISCONNECTED_WHILE_STREAMING": "outcomes",
    "SUCCESS": "outcomes",
    "UNKNOWN_ERROR_OCCURRED": "outcomes",
}

__all__ = [
    "Admission",
    "Load",
    "ChatStream",
    "ChatStreamError",
    "ChatStreamMiddleware",
    "GenerationParams",
    "AbstractChatPrompt",
    "ChatContent",
    "ChatPrompt",
    "RoleType",
    "PromptTTL",
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
    "RedisStore",
    "MemoryStore",
    "Session",
    "SessionStore",
    "CLIENT_DISCONNECTED_BEFORE_STREAMING",
    "CLIENT_DISCONNECTED_WHILE_STREAMING",
    "SUCCESS",
    "UNKNOWN_ERROR_OCCURRED",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'chatstream_asgi' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"chatstream_asgi.{home}"), name)
    globals()[name] = value
    return value
