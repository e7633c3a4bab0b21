"""One request's way through the fleet, as canonical events:

model resolution → ready node (cold load if needed; `Waiting` pings meanwhile) → chat template
and tokenization → Triton stream → incremental detokenization → stop strings → tool-call
parsing → `Finished` with usage. Metrics are recorded here, on the canonical events, so both
dialects count the same. Leaving the iterator early (client gone) cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from control_plane.canonical import (
    ChatRequest,
    Event,
    Finished,
    FinishReason,
    Started,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    Waiting,
)
from control_plane.errors import CortexError, InvalidRequest, PromptTooLong, UpstreamFailed
from control_plane.fleet import Fleet
from control_plane.metrics import GatewayMetrics
from control_plane.node_client import GenerationParams
from control_plane.prompting import StopMatcher
from control_plane.tool_calls import parser_for

PING_INTERVAL_S = 5.0
T = TypeVar("T")


async def _with_pings(awaitable: asyncio.Future[T] | asyncio.Task[T]) -> AsyncIterator[T | None]:
    """Yield None every PING_INTERVAL_S until the awaitable is done, then its result."""
    while True:
        done, _ = await asyncio.wait({awaitable}, timeout=PING_INTERVAL_S)
        if done:
            yield awaitable.result()
            return
        yield None


async def prepare(fleet: Fleet, request: ChatRequest) -> tuple[str, list[int], int]:
    """Resolve the model and render the prompt: (model, prompt ids, max new tokens)."""
    entry = fleet.resolve(request.model)
    model = entry.profile.name
    tokenizer = await fleet.tokenizer(model)
    prompt = await asyncio.to_thread(tokenizer.render, request)
    context = min(tokenizer.context_length, entry.context_length)
    if len(prompt) >= context:
        raise PromptTooLong(len(prompt), context, request.max_tokens)
    room = context - len(prompt)
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    return model, prompt, min(request.max_tokens or room, room)


async def generate(
    fleet: Fleet, metrics: GatewayMetrics, request: ChatRequest, api: str
) -> AsyncGenerator[Event, None]:
    started = time.monotonic()
    model, prompt, max_tokens = await prepare(fleet, request)
    tokenizer = await fleet.tokenizer(model)
    entry = fleet.resolve(model)

    ready = asyncio.ensure_future(fleet.ensure_ready(model))
    node = ""
    try:
        async for result in _with_pings(ready):
            if result is None:
                yield Waiting()
            else:
                node = result
    finally:
        if not ready.done():
            ready.cancel()
    metrics.queue_wait.labels(model).observe(time.monotonic() - started)
    yield Started(model, len(prompt))

    labels = (model, node, api)
    params = GenerationParams(
        max_tokens=max_tokens,
        end_ids=tuple(tokenizer.eos_token_ids) or (0,),
        pad_id=tokenizer.pad_token_id or 0,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_k=request.top_k or 0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        seed=request.seed,
    )
    decoder = tokenizer.stream_decoder(prompt)
    stopper = StopMatcher(request.stop)
    parser = parser_for(entry.profile.tool_call_format.value, bool(request.tools))
    completion = 0
    first_token_at: float | None = None
    outcome = "error"
    metrics.in_flight.labels(model, node).inc()
    try:
        async with fleet.using(node, model) as triton:
            stream = triton.generate(model, prompt, params, request.request_id)
            try:
                async for tokens in stream:
                    if tokens and first_token_at is None:
                        first_token_at = time.monotonic()
                        metrics.ttft.labels(*labels).observe(first_token_at - started)
                    text = ""
                    for token in tokens:
                        completion += 1
                        text += decoder.step(token)
                    for event in parser.feed(stopper.feed(text)):
                        yield event
                    if stopper.matched:
                        break
            finally:
                await stream.aclose()
        if not stopper.matched:
            for event in parser.feed(stopper.feed(decoder.finish())):
                yield event
            for event in parser.feed(stopper.flush()):
                yield event
        for event in parser.finish():
            yield event
        if stopper.matched:
            reason = FinishReason.STOP_SEQUENCE
        elif parser.calls:
            reason = FinishReason.TOOL_CALLS
        elif completion >= max_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        outcome = "ok"
        yield Finished(reason, Usage(len(prompt), completion), stopper.matched)
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "cancelled"
        raise
    except CortexError as error:
        outcome = error.kind
        raise
    except Exception as error:  # a node failing mid-stream ends the stream with an error
        outcome = "api_error"
        raise UpstreamFailed(f"{model} on {node} failed: {error}") from error
    finally:
        metrics.in_flight.labels(model, node).dec()
        ended = time.monotonic()
        metrics.requests.labels(*labels, outcome).inc()
        metrics.input_tokens.labels(*labels).inc(len(prompt))
        metrics.output_tokens.labels(*labels).inc(completion)
        metrics.duration.labels(*labels).observe(ended - started)
        if first_token_at is not None and completion > 1:
            decode_time = ended - first_token_at
            metrics.inter_token.labels(*labels).observe(decode_time / (completion - 1))
            if decode_time > 0:
                metrics.tokens_per_second.labels(*labels).observe((completion - 1) / decode_time)


async def collect(events: AsyncIterator[Event]) -> tuple[str, list[tuple[str, str, str]], Finished]:
    """A whole answer: (text, [(call id, name, arguments)], finish) for non-streaming replies."""
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = [event.id, event.name, ""]
        elif isinstance(event, ToolCallDelta):
            calls[event.index][2] += event.arguments
        elif isinstance(event, Finished):
            finished = event
    if finished is None:
        raise UpstreamFailed("the stream ended without a result")
    return "".join(text), [(c[0], c[1], c[2]) for c in calls.values()], finished
