"""An app whose model fails mid-reply, run by plain `uvicorn` in its own process (the deploy
recipe's engine-failure cut, tests/test_deploy_recipe.py).

`CHATSTREAM_TEST_MODEL` names the model folder; from the `CHATSTREAM_TEST_FAIL_AFTER`th decode
step after each prefill on, the model raises, so every reply streams a few tokens and is then cut
by an engine failure (a step tried again alone, as the batching engine does to find the failing
row, fails too). One chat runs at a time, so the steps counted are one reply's.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware

_model_dir = os.environ["CHATSTREAM_TEST_MODEL"]
_fail_after = int(os.environ["CHATSTREAM_TEST_FAIL_AFTER"])
_decode_steps = 0
model = AutoModelForCausalLM.from_pretrained(_model_dir)


def _fail_mid_reply(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
    """A forward pre-hook, on the engine's thread: a prefill (more than one new token) starts a
    reply; from its `_fail_after`th decode step on, every step raises."""
    global _decode_steps
    input_ids = kwargs.get("input_ids")
    if input_ids is not None and input_ids.shape[1] > 1:
        _decode_steps = 0
        return
    _decode_steps += 1
    if _decode_steps >= _fail_after:
        raise RuntimeError("simulated model failure mid-reply")


model.register_forward_pre_hook(_fail_mid_reply, with_kwargs=True)
chat_stream = ChatStream(
    model=model,
    tokenizer=AutoTokenizer.from_pretrained(_model_dir),
    device="cpu",
    num_of_concurrent_executions=1,
    max_queue_size=4,
    max_new_tokens=1024,  # any a client asks: the model fails long before
    temperature=0,
)
app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, health=True)
