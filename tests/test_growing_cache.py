"""The batching engine's key/value cache grows in place (issue 21, item 1): a decode step writes its
column into room the buffers already have instead of copying the whole cache to append it, and
the batch's operations (rows merging, leaving, left-trimmed padding, a failed step undone) keep
exactly the columns transformers' own `DynamicLayer` keeps. Greedy replies stay token for token
`model.generate`'s, at short and 4,000-token contexts, with grouped-query heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer

from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import ChatPrompt
from chatstream_asgi.engine import BatchingEngine
from chatstream_asgi.engine.growing_cache import GrowingLayer, growing_cache
from chatstream_asgi.frontends.demo_model import build_demo_model

from .conftest import greedy_reply, wait_until


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine's thread side is backend-neutral; one backend is enough here


def _columns(rows: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (rows, 2 heads, count, 4) whose entries say their row and position."""
    positions = torch.arange(start, start + count, dtype=torch.float32).view(1, 1, count, 1)
    row = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1) * 10_000
    keys = (positions + row).expand(rows, 2, count, 4).clone()
    return keys, -keys


def test_a_decode_step_writes_into_room_the_buffers_already_have() -> None:
    layer = GrowingLayer()
    layer.update(*_columns(3, 0, 1000))
    room = layer.room
    assert room >= 1000 + 64
    where = layer.keys.data_ptr()
    for step in range(room - 1000):
        keys, _ = layer.update(*_columns(3, 1000 + step, 1))
        assert keys.data_ptr() == where  # no copy: the same buffer, one more column in use
    assert keys.shape == (3, 2, room, 4) and torch.equal(keys, _columns(3, 0, room)[0])
    layer.update(*_columns(3, room, 1))  # full: it moves once to a buffer a quarter larger at least
    assert layer.room >= room + (room + 1) // 4 and torch.equal(layer.keys, _columns(3, 0, room + 1)[0])


def test_the_batchs_operations_keep_the_columns_a_plain_dynamic_layer_keeps() -> None:
    growing, plain = GrowingLayer(), DynamicLayer()
    for layer in (growing, plain):
        layer.update(*_columns(4, 0, 50))
    growing.trim_left(7)
    plain.keys, plain.values = plain.keys[..., 7:, :], plain.values[..., 7:, :]
    for step in range(3):
        for layer in (growing, plain):
            layer.update(*_columns(4, 50 + step, 1))
    growing.cut_to(44)  # a failed step undone
    plain.keys, plain.values = plain.keys[..., :44, :], plain.values[..., :44, :]
    rows = torch.tensor([3, 1])
    for layer in (growing, plain):
        layer.batch_select_indices(rows)
        layer.update(*_columns(2, 99, 2))
    assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
    assert growing.get_seq_length() == plain.get_seq_length() == 46
    growing.crop(-6)
    assert torch.equal(growing.keys, plain.keys[..., :40, :])


def test_a_growing_cache_has_one_growing_layer_per_model_layer(model: Any) -> None:
    cache = growing_cache(model.config)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer] * model.config.num_hidden_layers


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model whose 4 query heads share 2 key/value heads (SmolLM2's 9 share 3)."""
    folder = build_demo_model(tmp_path_factory.mktemp("gqa-model"), hidden_size=64, num_hidden_layers=2, seed=5)
    config = AutoModelForCausalLM.from_pretrained(folder).config
    config.num_key_value_heads = config.num_attention_heads // 2
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.anyio
async def test_greedy_replies_at_short_and_4000_token_contexts_are_generates_with_rows_joining_and_leaving(
    gqa_model_dir: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(gqa_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(gqa_model_dir)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    long_text = " ".join(f"word{i % 211}" for i in range(620))  # about 4,000 tokens
    asks = {"short": ("hello there", 40), "long": (long_text, 24), "brief": ("bye", 5), "late": ("and you?", 30)}
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": long_text}], tokenize=False)
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert 3800 < prompt_tokens < 4096 - 24
    engine = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=8, conversation_cache_bytes=0)
    assert wait_until(lambda: engine.ready)
    replies: dict[str, str] = {}

    async def ask(name: str, delay: float) -> None:
        await anyio.sleep(delay)  # "late" joins a batch that is already running
        text, tokens = asks[name]
        prompt = ChatPrompt.from_messages([{"role": "user", "content": text}])
        reply = ""
        params = GenerationParams(max_new_tokens=tokens, temperature=0)
        async with engine.generate(prompt, params, context_len=4096) as generation:
            while (piece := await generation.next_text(30.0)) is not None:
                reply += piece
        replies[name] = reply

    try:
        async with anyio.create_task_group() as group:
            for name in asks:
                group.start_soon(ask, name, 0.3 if name == "late" else 0.0)
    finally:
        engine.close()
    for name, (text, tokens) in asks.items():
        assert replies[name] == greedy_reply(model, tokenizer, text, tokens), name
