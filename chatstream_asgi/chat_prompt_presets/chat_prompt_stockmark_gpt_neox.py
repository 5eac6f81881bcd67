"""stockmark/gpt-neox-japanese-1.4b: a base model that continues text; the turns are simply joined."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent


class ChatPromptStockmarkGptNeoxJp(PresetChatPrompt):
    """Text continuation: no roles; a pending reply adds nothing (ChatStream's repeats the previous message)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("")
        self.set_responder("")

    def get_stop_strs(self) -> list[str] | None:
        return [] if self.chat_mode else None

    def render(self, content: ChatContent) -> str:
        return content.message or ""
