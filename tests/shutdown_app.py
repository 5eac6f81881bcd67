"""An app for the shutdown tests, run by plain `uvicorn` in its own process.

`CHATSTREAM_TEST_MODEL` names the model folder; each forward pass sleeps `CHATSTREAM_TEST_STEP`
seconds (a slow model), so chats are still running when the server stops. Each outcome is
printed as `outcome <name> <prompt_turns>` (the conversation's stored turns at that moment).
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.applications import Starlette
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware

_model_dir = os.environ["CHATSTREAM_TEST_MODEL"]
_step = float(os.environ.get("CHATSTREAM_TEST_STEP", "0"))
model = AutoModelForCausalLM.from_pretrained(_model_dir)
model.register_forward_pre_hook(lambda module, args: time.sleep(_step))  # on the engine's thread


def _print_outcome(request: Any, outcome: str) -> None:
    print("outcome", outcome, flush=True)


chat_stream = ChatStream(
    model=model,
    tokenizer=AutoTokenizer.from_pretrained(_model_dir),
    device="cpu",
    num_of_concurrent_executions=2,
    max_queue_size=4,
    max_new_tokens=200,
    temperature=0,
    stream_format="sse",
)
app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, health=True, callback=_print_outcome)
