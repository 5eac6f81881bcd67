"""No framework at all: serve mode around a bare ASGI callable.

Run: python examples/bare_asgi.py   (CHATSTREAM_MODEL as in fastapi_plain.py)
"""

import os

import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.frontends.default_model import ensure_default_model

model_path = os.environ.get("CHATSTREAM_MODEL") or ensure_default_model()
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
chat_stream = ChatStream(model=model, tokenizer=tokenizer)


async def not_found(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"not found"})


app = ChatStreamMiddleware(not_found, chat_stream=chat_stream, serve=True)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
