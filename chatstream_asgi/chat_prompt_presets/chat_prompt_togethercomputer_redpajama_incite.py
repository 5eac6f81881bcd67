"""togethercomputer/RedPajama-INCITE-Chat (3B, 7B): `<human>: text` / `<bot>: text` lines."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent


class ChatPromptTogetherRedPajamaINCITEChat(PresetChatPrompt):
    """`<human>: Who is Alan Turing\\n<bot>:`; stops at the model's own `<human>:` or `<|endoftext|>`."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")
        self.set_prefix_as_stop_str_enabled(True)

    def get_stop_strs(self) -> list[str] | None:
        return ["<|endoftext|>"]

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        return f"{content.role}: {content.message}\n" if content.message else f"{content.role}:"
