"""The seed's intercepting and callback forms behind fastsession, on paths of the app's choosing."""

import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastsession import FastSessionMiddleware, MemoryStore
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream import ChatStream

model_path = os.environ["CHATSTREAM_MODEL"]
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
chat_stream = ChatStream(
    model=model, tokenizer=tokenizer, device="cpu", max_new_tokens=8, num_of_concurrent_executions=2, max_queue_size=5
)

app = FastAPI()
app.add_middleware(
    FastSessionMiddleware, secret_key="your-session-secret-key", store=MemoryStore(), http_only=True, secure=False
)

finished = []  # what the callback saw: (outcome, prompt text)


def callback_func(request, message):
    session_mgr = getattr(request.state, "session", None)
    session = session_mgr.get_session()
    chat_prompt = session.get("chat_prompt")
    finished.append((message, chat_prompt.create_prompt()))


@app.post("/api/chat")
async def chat_with_callback(request: Request):
    response = await chat_stream.handle_chat_stream_request(request, callback=callback_func)
    return response


@app.post("/api/intercept")
async def chat_intercepted(request: Request):
    request_body = await request.body()
    data = json.loads(request_body)
    if "forbidden" in data["user_input"]:
        return JSONResponse({"error": "refused"}, status_code=403)
    response = await chat_stream.handle_chat_stream_request(request, request_body)
    return response


@app.on_event("startup")
async def startup():
    await chat_stream.start_queue_worker()
