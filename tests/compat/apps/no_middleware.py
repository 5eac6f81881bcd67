"""No session middleware at all, the endpoint on its own path: the handler keeps the session."""

import os

from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream import ChatStream

model_path = os.environ["CHATSTREAM_MODEL"]
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
chat_stream = ChatStream(model=model, tokenizer=tokenizer, device="cpu", max_new_tokens=8)

app = FastAPI()
finished = []


def callback_func(request, message):
    chat_prompt = request.state.session.get_session()["chat_prompt"]
    finished.append((message, chat_prompt.get_requester_last_msg()))


@app.post("/api/chat")
async def stream_api(request: Request):
    return await chat_stream.handle_chat_stream_request(request, callback=callback_func)
