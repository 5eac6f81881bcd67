"""line-corporation/japanese-large-lm-3.6b-instruction-sft: `ユーザー: text\\nシステム: `."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent, RoleType


class ChatPromptLineCorpJpLargeLmInstSft(PresetChatPrompt):
    """A user line ends with a newline, a reply does not (as ChatStream renders it); stops at `ユーザー: `."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("ユーザー")
        self.set_responder("システム")
        self.set_prefix_as_stop_str_enabled(True)

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        if not content.message:
            return f"{content.role}: "
        newline = "\n" if content.role_type is RoleType.REQUESTER else ""
        return f"{content.role}: {content.message}{newline}"
