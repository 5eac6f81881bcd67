"""Serve mode: the middleware answers POST /chat_stream itself; the app needs no chat endpoint.

Run: python examples/starlette_serve.py   (CHATSTREAM_MODEL as in fastapi_plain.py)
"""

import os

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.frontends.default_model import ensure_default_model

model_path = os.environ.get("CHATSTREAM_MODEL") or ensure_default_model()
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
chat_stream = ChatStream(model=model, tokenizer=tokenizer)


async def home(request):
    return PlainTextResponse("POST /chat_stream to chat")


def on_finished(request, outcome):
    print(f"chat ended: {outcome}")


app = ChatStreamMiddleware(
    Starlette(routes=[Route("/", home)]),
    chat_stream=chat_stream,
    serve=True,
    callback=on_finished,
    health=True,
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
