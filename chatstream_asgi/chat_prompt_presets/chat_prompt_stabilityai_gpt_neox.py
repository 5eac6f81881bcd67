"""stabilityai/japanese-stablelm-instruct-alpha-7b: the Japanese instruction format, whole history."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._instruction import JapaneseInstructionPrompt
from chatstream_asgi.core.prompt import PromptTTL


class ChatPromptStabilityAiJpGptNeoxInstSft(JapaneseInstructionPrompt):
    """`### 指示: \\n...\\n\\n### 応答: `, every turn in the prompt; stops at the model's own `### 指示: `."""

    def __init__(self) -> None:
        super().__init__()
        self.set_prompt_ttl(PromptTTL.MULTI_TURN)
