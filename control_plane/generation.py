"""One request's way through the fleet, as canonical events:

model resolution → ready node (cold load if needed; `Waiting` pings meanwhile) → chat template
and tokenization → Triton stream → incremental detokenization → stop strings → tool-call
parsing → `Finished` with usage. Metrics are recorded here, on the canonical events, so both
dialects count the same. Leaving the iterator early (client gone) cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
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
from control_plane.errors import (
    CortexError,
    InvalidRequest,
    PromptTooLong,
    UpstreamFailed,
    UpstreamTimeout,
)
from control_plane.fleet import Fleet
from control_plane.metrics import GatewayMetrics
from control_plane.node_client import GenerationParams
from control_plane.prompting import StopMatcher
from control_plane.tool_calls import parser_for
from cortex import logs

T = TypeVar("T")

log = logging.getLogger("cortex.requests")


async def _next(source: AsyncIterator[T]) -> T:
    return await source.__anext__()


async def _once(awaitable: Awaitable[T]) -> AsyncGenerator[T, None]:
    yield await awaitable


async def _paced(
    source: AsyncIterator[T], interval: float, deadline: float | None = None
) -> AsyncGenerator[T | None, None]:
    """The items of `source`, with a None for every `interval` seconds of silence (the callers
    turn it into a keep-alive), and UpstreamTimeout once `deadline` (monotonic) has passed."""
    while True:
        step = asyncio.ensure_future(_next(source))
        try:
            while True:
                wait = interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise UpstreamTimeout("the model did not finish in the request timeout")
                done, _ = await asyncio.wait({step}, timeout=wait)
                if done:
                    break
                if deadline is None or time.monotonic() < deadline:
                    yield None
        finally:
            if not step.done():  # the consumer left or timed out: stop the pending read
                step.cancel()
                await asyncio.wait({step})  # the source is idle again before anyone closes it
            if not step.cancelled():
                step.exception()  # marks a failure as seen when nobody is left to read it
        try:
            item = step.result()
        except StopAsyncIteration:
            return
        yield item


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


async def count_prompt_tokens(fleet: Fleet, request: ChatRequest) -> int:
    """The prompt's size exactly as `generate` would send it (template, tools, instructions);
    also for prompts too long to serve, so clients can decide to compact them."""
    entry = fleet.resolve(request.model)
    tokenizer = await fleet.tokenizer(entry.profile.name)
    return len(await asyncio.to_thread(tokenizer.render, request))


async def generate(
    fleet: Fleet, metrics: GatewayMetrics, request: ChatRequest, api: str
) -> AsyncGenerator[Event, None]:
    started = time.monotonic()
    logs.request_id.set(request.request_id)  # neuron calls and log lines made for it carry it
    settings = fleet.config.gateway
    model, prompt, max_tokens = await prepare(fleet, request)
    tokenizer = await fleet.tokenizer(model)
    entry = fleet.resolve(model)

    # A warm model is ready at once, so errors here still come before the first event (plain
    # HTTP errors); a cold load announces the request first, then keeps the stream alive.
    node = ""
    announced = False
    async with contextlib.aclosing(
        _paced(_once(fleet.ensure_ready(model)), settings.ping_interval_s)
    ) as readiness:
        async for result in readiness:
            if result is None:
                if not announced:
                    announced = True
                    yield Started(model, len(prompt))
                yield Waiting()
            else:
                node = result
    metrics.queue_wait.labels(model).observe(time.monotonic() - started)
    if not announced:
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
    parser = parser_for(
        entry.profile.tool_call_format.value, bool(request.tools), request.parallel_tool_calls
    )
    deadline = time.monotonic() + settings.request_timeout_s
    completion = 0
    first_token_at: float | None = None
    outcome = "error"
    metrics.in_flight.labels(model, node).inc()
    try:
        async with fleet.using(node, model) as triton:
            stream = triton.generate(model, prompt, params, request.request_id)
            try:
                async with contextlib.aclosing(
                    _paced(stream, settings.ping_interval_s, deadline)
                ) as steps:
                    async for tokens in steps:
                        if tokens is None:  # a long prefill: keep the client's stream alive
                            yield Waiting()
                            continue
                        if tokens and first_token_at is None:
                            first_token_at = time.monotonic()
                            metrics.ttft.labels(*labels).observe(first_token_at - started)
                        text = ""
                        for token in tokens:
                            completion += 1
                            text += decoder.step(token)
                        for event in parser.feed(stopper.feed(text)):
                            yield event
                        if stopper.matched or parser.done:
                            break
            finally:
                await stream.aclose()
        if not (stopper.matched or parser.done):
            for event in parser.feed(stopper.feed(decoder.finish())):
                yield event
            for event in parser.feed(stopper.flush()):
                yield event
        for event in parser.finish():
            yield event
        # Calls decide the reason even when a stop string came after them: the client must
        # answer the calls.
        if parser.calls:
            reason = FinishReason.TOOL_CALLS
        elif stopper.matched:
            reason = FinishReason.STOP_SEQUENCE
        elif completion >= max_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        outcome = "ok"
        stop_sequence = stopper.matched if reason is FinishReason.STOP_SEQUENCE else None
        yield Finished(reason, Usage(len(prompt), completion), stop_sequence)
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
        _log_request(
            request_id=request.request_id,
            model=model,
            node=node,
            api=api,
            outcome=outcome,
            prompt_tokens=len(prompt),
            completion_tokens=completion,
            ttft_s=None if first_token_at is None else round(first_token_at - started, 4),
            duration_s=round(ended - started, 4),
        )


def _log_request(**fields: object) -> None:
    """The one line per request: `key=value` pairs in text logs, fields in JSON logs."""
    text = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
    log.info("request %s", text, extra=fields)


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
