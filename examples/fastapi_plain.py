"""The plain endpoint: FastAPI hands the request to ChatStream, as in ChatStream's own examples.

Run: python examples/fastapi_plain.py   (CHATSTREAM_MODEL=path/or/hub-id picks the model;
unset, the default SmolLM2-135M-Instruct, as `chatstream-asgi serve` runs it; PORT picks the
port, 8000 unless set), then
curl -N http://127.0.0.1:8000/chat_stream -H 'Content-Type: application/json' -d '{"user_input": "Hello"}'
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


@app.post("/chat_stream")
async def stream_api(request: Request):
    response = await chat_stream.handle_chat_stream_request(request)
    return response


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
