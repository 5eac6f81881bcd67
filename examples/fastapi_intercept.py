"""The intercepting endpoint: read the body first (to log, check or reject), then hand it on.

Run: python examples/fastapi_intercept.py   (CHATSTREAM_MODEL as in fastapi_plain.py)
"""

import json
import os

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
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
    request_body = await request.body()
    data = json.loads(request_body)
    user_input = data.get("user_input", "")
    if "forbidden" in user_input:  # your own checks go here
        return JSONResponse({"error": "refused", "detail": "that topic is off limits"}, status_code=403)
    response = await chat_stream.handle_chat_stream_request(request, request_body)
    return response


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
