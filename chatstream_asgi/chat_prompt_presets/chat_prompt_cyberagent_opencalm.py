"""cyberagent/open-calm (3B, 7B): a base model that continues text; the turns are simply joined."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent


class ChatPromptCyberAgentOpenCalm(PresetChatPrompt):
    """Text continuation ("AIによって私達の暮らしは、" and the model goes on): no roles, no stop strings.

    A pending reply adds nothing (ChatStream's renders the previous message a second time there).
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("")
        self.set_responder("")

    def render(self, content: ChatContent) -> str:
        return content.message or ""
