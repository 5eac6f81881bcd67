"""One model replica per GPU in one process; each request goes to the least-loaded replica.

Run: python examples/several_gpus.py   (CHATSTREAM_MODEL as in fastapi_plain.py; CHATSTREAM_DEVICES
lists the devices, default: every visible GPU, or two CPU replicas on a machine without one)
"""

import os

import torch
import uvicorn
from starlette.applications import Starlette
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.frontends.default_model import ensure_default_model

model_path = os.environ.get("CHATSTREAM_MODEL") or ensure_default_model()
if os.environ.get("CHATSTREAM_DEVICES"):
    devices = os.environ["CHATSTREAM_DEVICES"].split(",")
elif torch.cuda.device_count() > 0:
    devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
else:
    devices = ["cpu", "cpu"]

tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
# The other replicas are loaded again from model_path, each onto its own device.
chat_stream = ChatStream(
    model=model,
    tokenizer=tokenizer,
    devices=devices,
    num_of_concurrent_executions=2,  # per replica
    max_queue_size=10,  # one queue for all of them
)

app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, openai=True, health=True)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
