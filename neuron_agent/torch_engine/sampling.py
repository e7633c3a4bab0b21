"""Choosing the next token: greedy, temperature, top-k, top-p, with per-request seeded generators
(the same seed gives the same output, whatever else shares the batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuron_agent.engines.logprobs import MAX_TOP_LOGPROBS as MAX_TOP_LOGPROBS
from neuron_agent.engines.logprobs import TokenLogprob as TokenLogprob


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities a sampled token is drawn from: float32 logits [..., vocab] with
    temperature, top-k and top-p applied, softmaxed over the last dimension (speculation's
    verify step weighs candidates against exactly these)."""
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        threshold = torch.topk(scaled, params.top_k).values[..., -1:]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered)
    return torch.softmax(scaled, dim=-1)


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """One token from float32 logits [vocab], as a one-element tensor on their device (no
    device→host copy: the batch's tokens come back together)."""
    return torch.multinomial(distribution(logits, params), 1, generator=generator)


def sample_batch(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row of logits [rows, vocab], given the rows' argmax `greedy` [rows], as a
    tensor on their device. Sampled rows are drawn there too, so the batch's tokens cross to the
    host in one copy (a copy per row dominated decode steps at batch 32 on a GPU)."""
    sampled = [
        (row, generator)
        for row, (row_params, generator) in enumerate(zip(params, generators, strict=True))
        if not row_params.greedy and generator is not None
    ]
    if not sampled:
        return greedy
    chosen = greedy.clone()
    for row, generator in sampled:
        chosen[row : row + 1] = sample_row(logits[row], params[row], generator)
    return chosen


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, rows: list[int], tops: list[int]
) -> list[TokenLogprob]:
    """For each of `rows` of logits [batch, vocab]: the chosen token's logprob and its row's
    `tops[i]` best (one log-softmax over the rows that asked; one copy to the host)."""
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    picked = logprobs.gather(1, chosen[index].view(-1, 1)).view(-1).tolist()
    most = max(tops)
    if most == 0:
        return [TokenLogprob(value) for value in picked]
    values, ids = torch.topk(logprobs, most, dim=-1)
    values_list, ids_list = values.tolist(), ids.tolist()
    return [
        TokenLogprob(value, tuple(ids_list[i][:top]), tuple(values_list[i][:top]))
        for i, (value, top) in enumerate(zip(picked, tops, strict=True))
    ]


class HostCopy:
    """Device tokens → a Python list through a pinned buffer, waiting on a CUDA event.

    `.tolist()` on a CUDA tensor waits for the GPU with the GIL held; inside Triton's stub that
    stops the thread sending responses for the whole step. An event's wait lets it go."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self._buffer = torch.empty(size, dtype=torch.long, pin_memory=True)
            self._ready = torch.cuda.Event()

    def tolist(self, tokens: torch.Tensor) -> list[int]:
        if self.device.type != "cuda":
            return [int(token) for token in tokens.tolist()]
        count = tokens.shape[0]
        self._buffer[:count].copy_(tokens, non_blocking=True)
        self._ready.record()
        self._ready.synchronize()
        return self._buffer[:count].tolist()
