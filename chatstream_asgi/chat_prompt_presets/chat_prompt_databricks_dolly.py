"""databricks/dolly-v2 (3B, 7B, 12B): Dolly's instruction format, `### Instruction:` / `### Response:`."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent, PromptTTL

DOLLY_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


class ChatPromptDatabricksDolly(PresetChatPrompt):
    """Dolly's intro, a blank line, `### Instruction:\\ntext\\n\\n` blocks and the cue `### Response:\\n`."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(DOLLY_SYSTEM)
        self.set_requester("Instruction")
        self.set_responder("Response")
        self.set_prefix_as_stop_str_enabled(True)
        self.set_prompt_ttl(PromptTTL.MULTI_TURN)

    def head(self) -> str:
        return self.system + "\n\n"

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        return f"### {content.role}:\n{content.message}\n\n" if content.message else f"### {content.role}:\n"
