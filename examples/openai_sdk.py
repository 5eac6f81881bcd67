"""Talk to chatstream-asgi with the official openai SDK (streaming and not).

Start a server first, e.g. `chatstream-asgi serve` (it serves /v1 by default), then run:
python examples/openai_sdk.py   (CHATSTREAM_URL=http://127.0.0.1:8000 and CHATSTREAM_API_KEY if the
server was started with --api-key)
"""

import os

from openai import OpenAI


def main() -> None:
    base_url = os.environ.get("CHATSTREAM_URL", "http://127.0.0.1:8000") + "/v1"
    client = OpenAI(base_url=base_url, api_key=os.environ.get("CHATSTREAM_API_KEY", "not-needed"))
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Say hello."}]

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=32)
    print("whole:", reply.choices[0].message.content)

    print("streamed: ", end="")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=32, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
