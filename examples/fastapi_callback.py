"""The endpoint with a completion callback: see how each request ended, and the conversation.

The callback is called exactly once per admitted request with one of: success,
client_disconnected_while_streaming, client_disconnected_before_streaming, unknown_error_occurred.

Run: python examples/fastapi_callback.py   (CHATSTREAM_MODEL as in fastapi_plain.py)
"""

import os

import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.frontends.default_model import ensure_default_model

model_path = os.environ.get("CHATSTREAM_MODEL") or ensure_default_model()
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)

chat_stream = ChatStream(
    model=model,
    tokenizer=tokenizer,
    device="auto",
    num_of_concurrent_executions=2,
    max_queue_size=5,
)

app = FastAPI()
app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)


def callback_func(request, message):
    print(f"request finished: {message}")
    session_mgr = getattr(request.state, "session", None)
    session = session_mgr.get_session()
    chat_prompt = session.get("chat_prompt")
    print(chat_prompt.create_prompt())


@app.post("/chat_stream")
async def stream_api(request: Request):
    response = await chat_stream.handle_chat_stream_request(request, callback=callback_func)
    return response


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
