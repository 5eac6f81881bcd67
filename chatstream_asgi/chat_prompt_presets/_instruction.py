"""The Alpaca-style Japanese instruction format shared by two presets: `### 指示: ` / `### 入力: ` / `### 応答: `."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent

INSTRUCTION_SYSTEM = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
)


class JapaneseInstructionPrompt(PresetChatPrompt):
    """The system text, a blank line, then `### 役割: \\n本文\\n\\n` blocks; a user message's child
    texts follow as one `### 入力: ` block; a pending reply is the cue `### 応答: `."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(INSTRUCTION_SYSTEM)
        self.set_requester("指示")
        self.set_responder("応答")
        self.set_prefix_as_stop_str_enabled(True)

    def head(self) -> str:
        return self.system + "\n\n"

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        if not content.message:
            return f"### {content.role}: "
        block = f"### {content.role}: \n{content.message}\n\n"
        if content.has_child_messages():
            block += "### 入力: \n" + "".join(f"{child}\n\n" for child in content.get_child_messages() or [])
        return block
