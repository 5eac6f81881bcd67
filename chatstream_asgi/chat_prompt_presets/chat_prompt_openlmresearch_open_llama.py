"""openlm-research/open_llama (3B v2, ...): a question-and-answer transcript, `Q: text` / `A: text`."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent


class ChatPromptOpenlmrOpenLlama(PresetChatPrompt):
    """`Q: What is the largest animal?\\nA:`; stops at a new line that starts `Q:`, `B:` or `C:`."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("Q")
        self.set_responder("A")

    def get_stop_strs(self) -> list[str] | None:
        # A base model keeps writing the quiz on; these line starts end the answer.
        return ["\nQ:", "\nB:", "\nC:"] if self.chat_mode else None

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        return f"{content.role}: {content.message}\n" if content.message else f"{content.role}:"
