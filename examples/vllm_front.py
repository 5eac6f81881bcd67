"""Put chatstream-asgi in front of vLLM, TGI, llama.cpp's server (or another chatstream-asgi).

The serving cluster generates; this process adds sessions and history (/chat_stream), the
ChatStream APIs, admission with a bounded queue, and outcome callbacks, and it stops the upstream
generation when a client leaves.

Run: UPSTREAM_URL=http://gpu-host:8000/v1 UPSTREAM_MODEL=served-model-name python examples/vllm_front.py
"""

import os

import uvicorn
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import OpenAIEngine

engine = OpenAIEngine(
    base_url=os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8001/v1"),
    model=os.environ.get("UPSTREAM_MODEL", "served-model-name"),
    api_key=os.environ.get("UPSTREAM_API_KEY"),
    timeout=60.0,
)
# Admission here should match what the upstream can run at once.
chat_stream = ChatStream(engine=engine, num_of_concurrent_executions=8, max_queue_size=32)


def on_finished(request, outcome):
    print(f"chat ended: {outcome}")


app = ChatStreamMiddleware(
    Starlette(),
    chat_stream=chat_stream,
    serve=True,
    callback=on_finished,
    apis={"exclude": ["get_prompt"]},
    openai=True,
    health=True,
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
