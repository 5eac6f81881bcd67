"""matsuo-lab/weblab-10b-instruction-sft: the Japanese instruction format, one turn at a time."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._instruction import JapaneseInstructionPrompt
from chatstream_asgi.core.prompt import PromptTTL


class ChatPromptMatsuoLabJpGptNeoxInstSft(JapaneseInstructionPrompt):
    """Only the newest instruction is in the prompt (`PromptTTL.SINGLE_TURN`); stops at `### 指示: ` or `Q:`."""

    def __init__(self) -> None:
        super().__init__()
        self.set_prompt_ttl(PromptTTL.SINGLE_TURN)

    def get_stop_strs(self) -> list[str] | None:
        return ["Q:"] if self.chat_mode else None
