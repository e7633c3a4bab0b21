"""Choosing the next token: greedy, temperature, top-k, top-p, with per-request seeded generators
(the same seed gives the same output, whatever else shares the batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """One token from float32 logits [vocab], as a one-element tensor on their device (no
    device→host copy: the batch's tokens come back together)."""
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        threshold = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, ordered)
    probabilities = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator)


def sample_batch(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row of logits [rows, vocab], given the rows' argmax `greedy` [rows].
    Sampled rows are drawn on the device; the batch's tokens cross to the host in one copy
    (a copy per row dominated decode steps at batch 32 on a GPU)."""
    sampled = [
        (row, generator)
        for row, (row_params, generator) in enumerate(zip(params, generators, strict=True))
        if not row_params.greedy and generator is not None
    ]
    if not sampled:
        return [int(token) for token in greedy.tolist()]
    chosen = greedy.clone()
    for row, generator in sampled:
        chosen[row : row + 1] = sample_row(logits[row], params[row], generator)
    return [int(token) for token in chosen.tolist()]
