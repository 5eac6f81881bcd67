"""A Quart app gains POST /chat_stream by wrapping its ASGI app in serve mode.

Run: python examples/quart_serve.py   (CHATSTREAM_MODEL as in fastapi_plain.py)
"""

import os

import uvicorn
from quart import Quart
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.frontends.default_model import ensure_default_model

model_path = os.environ.get("CHATSTREAM_MODEL") or ensure_default_model()
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
chat_stream = ChatStream(model=model, tokenizer=tokenizer)

app = Quart(__name__)


@app.route("/")
async def home():
    return "POST /chat_stream to chat"


app.asgi_app = ChatStreamMiddleware(app.asgi_app, chat_stream=chat_stream, serve=True, health=True)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
