"""ChatStream's docs: mock responses for fast start-up, client roles, append_middlewares/append_apis."""

from fastapi import FastAPI

from chatstream import ChatStream

client_roles = {
    "user": {
        "apis": {
            "allow": ["chat_stream", "clear_context", "set_feedback"],
            "auth_method": "nothing",  # default role
            "use_session": True,
        }
    },
    "developer": {
        "apis": {
            "allow": "all",
            "auth_method": "ui_pass_phrase",
            "ui_pass_phrase": "i am a developer",
            "use_session": True,
            "enable_dev_tool": True,
        }
    },
    "agent": {
        "apis": {
            "allow": ["chat_stream", "get_load"],
            "auth_method": "nothing",
            "use_session": False,
        }
    },
    "server_admin": {
        "apis": {
            "allow": "all",
            "auth_method": "header_phrase",
            "header_phrase": "admin-secret-phrase",
            "use_session": False,
        }
    },
}

chat_stream = ChatStream(
    num_of_concurrent_executions=2,
    max_queue_size=5,
    use_mock_response=True,
    mock_params={"type": "round", "time_per_token_sec": 0.001},
    client_roles=client_roles,
)

app = FastAPI()
chat_stream.append_middlewares(app)
chat_stream.append_apis(app, {"all": True})

chat_stream.logger.info("ChatStream app ready (mock: %s)", chat_stream.params.get("temperature"))


@app.on_event("startup")
async def startup():
    await chat_stream.start_queue_worker()
