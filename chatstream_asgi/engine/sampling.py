"""`BatchSampling`: the next token of every row of a batch, each with its own parameters, at once.

Each row's temperature, top-k, top-p, repetition penalty and seed live in tensors of the batch's
length, so one step samples every row with a few tensor operations and no Python loop over rows.
The order is transformers': repetition penalty, temperature, top-k, top-p. Top-p is computed only
over the top-k candidates (the largest top-k of the batch's sampled rows; the others' extra
candidates are masked), never over a sort of the whole vocabulary unless a row asks for no top-k.

Greedy rows (temperature 0) take the argmax of their (penalised) logits, which is what
`model.generate` does: a batch of greedy rows is token for token `model.generate`'s reply.

Sampling is by inverse transform: one uniform number per row picks a token from the cumulative
probabilities of its candidates. An unseeded row draws its number from torch's generator; a seeded
row's n-th number is a hash of (seed, n), so it depends on nothing else in the batch: a seeded
reply is the same alone or in any company, as many times as it is asked for.

`verify` checks drafted tokens (prompt lookup, `lookup.py`) against the model's own choices. A
greedy row keeps a drafted token where it is the argmax, so it writes exactly what plain decoding
writes. A sampled row keeps it with the probability its distribution gives it and, where it does
not, draws from that distribution without it (speculative sampling's rule for a draft that is
one token for sure), so its tokens are distributed exactly as plain sampling's; a seeded row
draws every number from its seed and its count of draws, so it stays reproducible.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from chatstream_asgi.core.params import GenerationParams

_MASK32 = 0xFFFFFFFF
_Integers = TypeVar("_Integers", int, torch.Tensor)


def _mix32(value: _Integers) -> _Integers:
    """A 32-bit integer hash (two multiply-xorshift rounds), exact in int64 arithmetic."""
    value = ((value >> 16) ^ value) * 0x45D9F3B & _MASK32
    value = ((value >> 16) ^ value) * 0x45D9F3B & _MASK32
    return (value >> 16) ^ value


def _seed_key(seed: int) -> int:
    """A seed of any size folded into the 32-bit key its numbers are hashed from."""
    return _mix32(_mix32(seed >> 32 & _MASK32) ^ seed & _MASK32)  # its high and low words


class BatchSampling:
    """The sampling parameters and state (tokens seen, numbers drawn) of the rows of a batch."""

    def __init__(
        self,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        penalty: torch.Tensor,
        seed_key: torch.Tensor,
        draws: torch.Tensor,
        seen: torch.Tensor,
    ) -> None:
        self.temperature = temperature  # (rows,) float; 0: greedy
        self.top_k = top_k  # (rows,) long; the vocabulary's size when the row has no top-k
        self.top_p = top_p  # (rows,) float
        self.penalty = penalty  # (rows,) float; 1: none
        self.seed_key = seed_key  # (rows,) long; -1: unseeded
        self.draws = draws  # (rows,) long: numbers a seeded row has drawn so far
        self.seen = seen  # (rows, vocabulary) bool: tokens in the row's prompt and reply
        # Decided when rows come or go, not every step (each is a device sync on a GPU).
        self._sampled = bool((temperature > 0).any())
        self._penalised = bool((penalty != 1.0).any())
        self._candidates = int(top_k[temperature > 0].max()) if self._sampled else 0

    @classmethod
    def for_row(cls, params: GenerationParams, prompt_ids: torch.Tensor, vocabulary: int) -> BatchSampling:
        """One row's sampling; `prompt_ids` (n,) are the tokens its repetition penalty starts from."""
        device = prompt_ids.device
        seen = torch.zeros(1, vocabulary, dtype=torch.bool, device=device)
        seen[0, prompt_ids] = True
        top_k = params.top_k if 0 < params.top_k < vocabulary else vocabulary
        return cls(
            temperature=torch.tensor([params.temperature], dtype=torch.float32, device=device),
            top_k=torch.tensor([top_k], device=device),
            top_p=torch.tensor([params.top_p], dtype=torch.float32, device=device),
            penalty=torch.tensor([params.repetition_penalty], dtype=torch.float32, device=device),
            seed_key=torch.tensor([-1 if params.seed is None else _seed_key(params.seed)], device=device),
            draws=torch.zeros(1, dtype=torch.long, device=device),
            seen=seen,
        )

    @classmethod
    def concat(cls, batches: list[BatchSampling]) -> BatchSampling:
        """The rows of `batches`, one after the other."""
        return cls(*(torch.cat(tensors) for tensors in zip(*(batch._tensors() for batch in batches), strict=True)))

    def select(self, index: torch.Tensor) -> BatchSampling:
        """Only the rows at `index`, in that order."""
        return BatchSampling(*(tensor[index] for tensor in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.temperature, self.top_k, self.top_p, self.penalty, self.seed_key, self.draws, self.seen)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row (rows, vocabulary) -> (rows,); records it as seen."""
        scores = self._scores(logits)
        tokens = scores.argmax(dim=-1)
        if self._sampled:
            tokens = torch.where(self.temperature > 0, self._pick(*self._weights(scores)), tokens)
        self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def verify(
        self, logits: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check each row's draft against the model (module docstring).

        `logits` (rows, width, vocabulary) are the model's at the row's next token and at each
        drafted one; `drafts` (rows, width - 1) the drafted tokens, of which each row has
        `lengths` (rows,). Returns how many drafted tokens each row keeps, and its tokens
        (rows, width): the kept draft, then the model's own next token; recorded as seen."""
        rows, width, _ = logits.shape
        device = logits.device
        taken = torch.zeros(rows, dtype=torch.long, device=device)
        tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
        sampled = self.temperature > 0
        checking = torch.ones(rows, dtype=torch.bool, device=device)  # every draft token so far kept
        for column in range(width):
            scores = self._scores(logits[:, column])
            drafting = checking & (lengths > column)
            draft = drafts[:, column] if column < width - 1 else torch.zeros_like(taken)
            choice = scores.argmax(dim=-1)
            kept = drafting & (choice == draft)
            if self._sampled:
                weights, candidates = self._weights(scores)
                is_draft = candidates == draft[:, None]
                share = (weights * is_draft).sum(dim=-1) / weights.sum(dim=-1)
                chance = self._uniforms(rows, device, drawing=drafting & sampled)
                kept = torch.where(sampled, drafting & (chance < share), kept)
                # A refused draft token is drawn again from what is left without it.
                refused = (drafting & ~kept)[:, None] & is_draft
                drawn = self._pick(weights.masked_fill(refused, 0.0), candidates, drawing=checking & ~kept & sampled)
                choice = torch.where(sampled, drawn, choice)
            tokens[:, column] = torch.where(kept, draft, choice)
            open_rows = checking.nonzero().squeeze(1)
            self.seen[open_rows, tokens[open_rows, column]] = True
            taken += kept
            checking = kept
            if not bool(checking.any()):
                break
        return taken, tokens

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, vocabulary) with each row's repetition penalty applied."""
        scores = logits.float()
        if self._penalised:
            penalty = self.penalty[:, None]
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen, penalised, scores)
        return scores

    def _weights(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's candidates (its top-k, by temperature-scaled score) and their weights after
        top-p (unnormalised: a candidate past top-p weighs 0)."""
        temperature = torch.where(self.temperature > 0, self.temperature, 1.0)[:, None]
        values, candidates = torch.topk(scores / temperature, self._candidates, dim=-1)  # sorted, largest first
        rank = torch.arange(self._candidates, device=scores.device)
        values = values.masked_fill(rank >= self.top_k[:, None], float("-inf"))
        probabilities = values.softmax(dim=-1)
        before = probabilities.cumsum(dim=-1) - probabilities
        probabilities = probabilities.masked_fill(before > self.top_p[:, None], 0.0)  # keeps the one crossing top_p
        return probabilities, candidates

    def _pick(
        self, weights: torch.Tensor, candidates: torch.Tensor, drawing: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A candidate for every row, drawn by its weight (greedy rows' are discarded by the caller);
        only the rows `drawing` (all by default) use up a number."""
        cumulative = weights.cumsum(dim=-1)
        target = self._uniforms(weights.shape[0], weights.device, drawing)[:, None] * cumulative[:, -1:]
        # (right=True: a candidate of weight 0 is never picked, even by a number that is exactly 0)
        choice = torch.searchsorted(cumulative, target, right=True).clamp_(max=self._candidates - 1)
        return candidates.gather(1, choice)[:, 0]

    def _uniforms(self, rows: int, device: torch.device, drawing: torch.Tensor | None = None) -> torch.Tensor:
        """One number in [0, 1) per row: a seeded row's from its hash, the others' from torch. Only
        the rows `drawing` (all by default) count it as drawn."""
        hashed = _mix32(_mix32(self.seed_key ^ self.draws) ^ self.seed_key)
        seeded = (hashed.double() + 0.5) / 2.0**32
        self.draws += 1 if drawing is None else drawing.long()
        return torch.where(self.seed_key >= 0, seeded, torch.rand(rows, dtype=torch.float64, device=device)).float()
