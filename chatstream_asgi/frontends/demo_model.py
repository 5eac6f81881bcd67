"""A tiny random-weight chat model, built offline, for tests and `--model demo-random`.

No machine this package is developed on reaches a model hub, and a test should not need one
either. The tokenizer is a byte-level BPE (like GPT-2's or Llama 3's) trained on a small
built-in text, so Japanese and emoji split across several tokens exactly as they do with a
real model; the model is a small Llama with random weights. Its replies mean nothing; the
streaming, queueing and cancellation around it are real.

Two variants. The tests' (the default) never ends a reply early: its end token's output row is
zero, so every reply runs to its token limit, which streaming and cancellation tests rely on.
The `readable` one, which `--model demo-random` serves, emits whole words, punctuation and its
end token: a person trying it sees words that end, not byte fragments that print as `\ufffd` and
control characters and run to the limit. The other tokens' output rows are zero, so they are only
ever picked at settings that flatten the distribution far past the defaults (temperature near 2
with top-k off lets them through).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"

# Jinja chat template in the common "<|role|>text" style; the generation prompt is the assistant cue.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SPECIAL_TOKENS = [EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Mostly English with a little Japanese, so that few Japanese characters get a token of their
# own: most of them, and every emoji, stay split into byte tokens.
_CORPUS = [
    "Hello! How can I help you today? I am a small demo model with random weights.",
    "The quick brown fox jumps over the lazy dog. Streaming text arrives token by token.",
    "Servers stream replies over HTTP; clients may disconnect at any moment.",
    "Please tell me about the weather, the news, and what we discussed before.",
    "日本語も少し話します。こんにちは。",
    "Numbers 0123456789 and punctuation: , . ; : ! ? ( ) [ ] { } - _ / \\ ' \"",
]


def build_demo_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    readable: bool = False,
) -> Path:
    """Write a random-weight Llama and its tokenizer to `path` (`from_pretrained` loads them).

    Larger `hidden_size` and `num_hidden_layers` make a model whose decode step costs what a
    real one's does, for benchmarks; `readable` makes the variant that emits words and ends.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _CORPUS * 4, vocab_size=vocab_size, min_frequency=2, special_tokens=_SPECIAL_TOKENS, show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe._tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    heads = max(1, hidden_size // 16)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        if readable:
            _speak_words(model.lm_head.weight, tokenizer, torch.Generator().manual_seed(seed))
        else:
            # Random weights would pick the end token now and then and cut replies short at
            # random; a zero row keeps its logit at 0, below the best of hundreds of others.
            model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.save_pretrained(path)
    return path


#: The tokens the readable variant may emit besides its end token: a space and a word, or punctuation.
_WORD_TOKEN = re.compile(r" [A-Za-z]{2,}|[.,!?]")
#: Output rows of emittable tokens get this scale: the largest of their logits then stands many
#: units above the 0 of a zeroed row, so sampling never picks anything else.
_WORD_ROW_SCALE = 0.5
#: The end token's row is this much larger than a word's, so it wins often enough to end replies:
#: sampled with the default settings from 16 seeds, 13 replies ended within 120 tokens (4 to 114)
#: and 1 ran to the 256-token limit.
_END_ROW_BOOST = 2.0


def _speak_words(output_rows: Any, tokenizer: Any, generator: Any) -> None:
    """Make the output layer pick only whole words, punctuation and the end token."""
    import torch

    output_rows.zero_()
    width = output_rows.shape[1]
    for token_id in range(output_rows.shape[0]):
        if token_id not in tokenizer.all_special_ids and _WORD_TOKEN.fullmatch(tokenizer.decode([token_id])):
            output_rows[token_id] = torch.randn(width, generator=generator) * _WORD_ROW_SCALE
    output_rows[tokenizer.eos_token_id] = torch.randn(width, generator=generator) * _WORD_ROW_SCALE * _END_ROW_BOOST


def cache_root() -> Path:
    """The package's cache folder: `$XDG_CACHE_HOME/chatstream-asgi`, else `~/.cache/chatstream-asgi`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "chatstream-asgi"


def default_demo_path() -> Path:
    """Where `--model demo-random` keeps its (readable) model between runs."""
    return cache_root() / "demo-random"


def ensure_demo_model(path: str | Path | None = None) -> Path:
    """The readable demo model's folder, built there first if it is not yet."""
    path = Path(path) if path is not None else default_demo_path()
    if not (path / "config.json").exists():
        build_demo_model(path, readable=True)
    return path
