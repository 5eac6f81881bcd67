"""mosaicml/mpt-7b-chat, as ChatStream drives it: the same `<human>:` / `<bot>:` lines as RedPajama."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent


class ChatPromptMosaicmlMptChat(PresetChatPrompt):
    """`<human>: text\\n<bot>:`; stops where the model starts a `<human>:` turn itself."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")
        self.set_prefix_as_stop_str_enabled(True)

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        return f"{content.role}: {content.message}\n" if content.message else f"{content.role}:"
