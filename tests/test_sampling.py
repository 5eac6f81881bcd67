"""Batched sampling: every row of a step sampled at once, each by its own parameters, and the
distribution each row draws from is the one transformers' own warpers give."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatstream_asgi import ChatPrompt
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine import BatchingEngine
from chatstream_asgi.engine.sampling import BatchSampling

from .conftest import greedy_reply, wait_until

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
PROMPT = torch.tensor([1, 6])  # tokens the repetition penalty acts on


def _rows(params: list[GenerationParams]) -> BatchSampling:
    return BatchSampling.concat([BatchSampling.for_row(row, PROMPT, LOGITS.shape[0]) for row in params])


def _transformers_probabilities(params: GenerationParams) -> torch.Tensor:
    warpers = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
    warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    scores = warpers(PROMPT[None, :], LOGITS[None, :].clone())
    return scores.softmax(dim=-1)[0]


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
        {"temperature": 0.7, "top_k": 4, "top_p": 1.0},
        {"temperature": 1.3, "top_k": 0, "top_p": 0.8},
        {"temperature": 0.9, "top_k": 5, "top_p": 0.7, "repetition_penalty": 1.5},
    ],
    ids=["plain", "top-k", "top-p", "all four"],
)
def test_rows_draw_from_the_distribution_transformers_warpers_give(settings: dict[str, Any]) -> None:
    draws = 20000
    params = GenerationParams(**settings)
    rows = _rows([params]).select(torch.zeros(draws, dtype=torch.long))  # one row, many times over
    torch.manual_seed(0)  # unseeded rows draw from torch's generator: fixed here, so the test cannot flake
    tokens = rows.sample(LOGITS.repeat(draws, 1))
    frequencies = torch.bincount(tokens, minlength=LOGITS.shape[0]).float() / draws
    expected = _transformers_probabilities(params)
    assert torch.allclose(frequencies, expected, atol=0.015), (frequencies, expected)
    assert not frequencies[expected == 0].any()  # never a token the warpers exclude


def test_rows_of_one_batch_each_keep_their_own_parameters() -> None:
    greedy = GenerationParams(temperature=0)
    top_two = GenerationParams(temperature=2.0, top_k=2, top_p=1.0)
    narrow_p = GenerationParams(temperature=1.0, top_k=0, top_p=0.3)
    penalised = GenerationParams(temperature=0, repetition_penalty=10.0)
    rows = [greedy, top_two, narrow_p, penalised] * 500
    tokens = _rows(rows).sample(LOGITS.repeat(len(rows), 1)).view(-1, 4)
    assert set(tokens[:, 0].tolist()) == {0}
    assert set(tokens[:, 1].tolist()) == {0, 1}
    assert set(tokens[:, 2].tolist()) <= {0, 1}  # the token that crosses top_p is kept, no more
    assert set(tokens[:, 3].tolist()) == {0}  # token 1 is penalised, 0 stays the largest
    penalised_first = BatchSampling.for_row(penalised, torch.tensor([0]), LOGITS.shape[0])
    assert int(penalised_first.sample(LOGITS[None, :])[0]) == 1


def test_seeded_rows_draw_from_the_same_distribution() -> None:
    draws = 5000
    params = [GenerationParams(temperature=0.8, top_k=5, top_p=0.9, seed=seed) for seed in range(draws)]
    tokens = _rows(params).sample(LOGITS.repeat(draws, 1))
    frequencies = torch.bincount(tokens, minlength=LOGITS.shape[0]).float() / draws
    assert torch.allclose(frequencies, _transformers_probabilities(params[0]), atol=0.03)


def test_a_seeded_row_draws_the_same_numbers_whatever_its_company() -> None:
    seeded = GenerationParams(temperature=1.5, top_k=0, top_p=1.0, seed=42)
    alone = _rows([seeded])
    crowd = _rows([GenerationParams(temperature=1.0), seeded, GenerationParams(temperature=0.5, top_k=3)])
    for _ in range(50):
        assert int(alone.sample(LOGITS[None, :])[0]) == int(crowd.sample(LOGITS.repeat(3, 1))[1])


def test_rows_with_different_seeds_draw_different_sequences() -> None:
    sequences = []
    for seed in (1, 2):
        row = _rows([GenerationParams(temperature=1.5, top_k=0, top_p=1.0, seed=seed)])
        sequences.append([int(row.sample(LOGITS[None, :])[0]) for _ in range(30)])
    assert sequences[0] != sequences[1]


def test_greedy_with_a_repetition_penalty_replies_what_generate_replies(model: Any, tokenizer: Any) -> None:
    engine = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=4)
    try:
        assert wait_until(lambda: engine.ready)
        prompt = ChatPrompt()
        prompt.add_requester_msg("repeat repeat repeat")
        prompt.add_responder_msg(None)
        params = GenerationParams(max_new_tokens=30, temperature=0, repetition_penalty=1.8)

        async def reply() -> str:
            text = ""
            async with engine.generate(prompt, params, context_len=2048) as gen:
                while (piece := await gen.next_text(5.0)) is not None:
                    text += piece
            return text

        served = anyio.run(reply)
    finally:
        engine.close()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "repeat repeat repeat"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
            repetition_penalty=1.8,
        )  # fmt: skip
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert served == expected and expected != greedy_reply(model, tokenizer, "repeat repeat repeat", 30)
