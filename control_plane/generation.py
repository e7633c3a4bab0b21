"""One request's way through the fleet, as canonical events:

model resolution → ready node (the replica holding the conversation's prefix, or a cold load;
`Waiting` pings meanwhile) → chat template and tokenization → Triton stream (tried again on
another node if its node fails before the first token) → incremental detokenization → stop strings → tool-call
parsing → `Finished` with usage. Metrics are recorded here, on the canonical events, so both
dialects count the same. Leaving the iterator early (client gone) cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from control_plane import keys
from control_plane.canonical import (
    ChatRequest,
    Event,
    Finished,
    ReasoningDelta,
    Started,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallStart,
    TopLogprob,
    Waiting,
)
from control_plane.errors import (
    CortexError,
    InvalidRequest,
    ModelNotFound,
    NodeUnavailable,
    PromptTooLong,
    UpstreamFailed,
)
from control_plane.fleet import Fleet
from control_plane.keys import ENGINE_PRIORITY
from control_plane.metrics import GatewayMetrics
from control_plane.node_client import GenerationParams, TokenLogprobs
from control_plane.output import Output
from control_plane.pacing import Paced
from control_plane.prompting import ModelTokenizer, StopMatcher
from control_plane.reasoning import ThinkSplitter, prompt_opens_reasoning, template_reasons
from control_plane.request_record import RequestRecord
from control_plane.routing import conversation_key
from control_plane.structured import Guide, check, check_logprobs, guide_for
from control_plane.tool_calls import CLOSE, OPEN, parser_for
from cortex import logs
from cortex.config import EngineKind, KeyPriority, ReasoningFormat, ToolCallFormat
from cortex.neuron_api import CatalogueEntry, RequestOutcome

T = TypeVar("T")

log = logging.getLogger("cortex.requests")

# How many nodes a request tries when they fail before its first token.
ATTEMPTS = 3

# Prompts up to this many characters (no tools) are rendered on the event loop: a thread hop
# costs more than their template and tokenization (~0.1 ms). Longer ones go to a thread, where
# the tokenizer's batch encode runs without the GIL and other streams keep flowing.
INLINE_RENDER_CHARS = 8192


async def _once(awaitable: Awaitable[T]) -> AsyncGenerator[T, None]:
    yield await awaitable


def _renderer() -> ThreadPoolExecutor:
    """The threads that render long prompts: one fewer than the cores (at least one), so
    renders at once never take every core from the event loop. The tokenizer lets go of the
    GIL while it encodes; a process pool stalled the loop a little less but needs each model's
    tokenizer in every worker (benchmarks/render_stall.py, BENCHMARKS.md)."""
    global _render_threads
    if _render_threads is None:
        workers = max(1, (os.cpu_count() or 2) - 1)
        _render_threads = ThreadPoolExecutor(workers, thread_name_prefix="cortex-render")
    return _render_threads


_render_threads: ThreadPoolExecutor | None = None


async def render(
    tokenizer: ModelTokenizer,
    request: ChatRequest,
    harmony: bool = False,
    conversation: str | None = None,
) -> list[int]:
    """The prompt's ids: small prompts at once, large ones in a render thread (a conversation's
    later turns tokenize only what is new: prompting.PromptMemo). An empty one is the
    client's mistake (nothing to answer), not the engine's to refuse. `harmony`: a gpt-oss
    model's, rendered by openai-harmony."""
    if request.raw_prompt is None and not request.messages:
        raise InvalidRequest("messages: the conversation has no content to answer", "messages")
    size = len(request.raw_prompt or "") + sum(len(m.content) for m in request.messages)
    if size <= INLINE_RENDER_CHARS and not request.tools:
        prompt = tokenizer.render(request, harmony=harmony, conversation=conversation)
    else:
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(
            _renderer(),
            functools.partial(
                tokenizer.render, request, harmony=harmony, conversation=conversation
            ),
        )
    if not prompt:
        field = "prompt" if request.raw_prompt is not None else "messages"
        raise InvalidRequest(f"{field}: the prompt is empty", field)
    return prompt


@dataclass(frozen=True)
class Prepared:
    """A request ready to send: its model, the prompt's ids and how many tokens it may add."""

    entry: CatalogueEntry
    tokenizer: ModelTokenizer
    prompt: list[int]
    max_tokens: int
    guide: Guide | None = None

    @property
    def model(self) -> str:
        return self.entry.profile.name


def chat_model(fleet: Fleet, requested: str) -> CatalogueEntry:
    """The model a chat request names; an embedding model is refused, naming the field."""
    entry = fleet.resolve(requested)
    if entry.profile.embedding:
        raise InvalidRequest(
            f"model: {entry.profile.name} is an embedding model; use /v1/embeddings",
            param="model",
        )
    return entry


async def prepare(fleet: Fleet, request: ChatRequest) -> Prepared:
    """Resolve the model, check its engine can honour the request's guide, render the prompt."""
    entry = chat_model(fleet, request.model)
    tokenizer = await fleet.tokenizer(entry.profile.name)
    tags = frozenset(tag for tag in (OPEN, CLOSE) if tokenizer.is_token(tag))
    guide = guide_for(request, entry.profile.tool_call_format.value, tags)
    if guide is not None:
        check(guide, entry.profile.engine, entry.profile.name)
    check_logprobs(request, entry.profile.engine, entry.profile.name)
    context = min(tokenizer.context_length, entry.context_length)
    fewest = tokenizer.fewest_tokens(request)
    if fewest >= context:  # cannot fit whatever the tokenizer makes of it: do not tokenize
        raise PromptTooLong(fewest, context, request.max_tokens, at_least=True)
    prompt = await render(tokenizer, request, _harmony(entry), conversation_key(request))
    if len(prompt) >= context:
        raise PromptTooLong(len(prompt), context, request.max_tokens)
    room = context - len(prompt)
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    return Prepared(entry, tokenizer, prompt, min(request.max_tokens or room, room), guide)


def generation_params(
    tokenizer: ModelTokenizer, request: ChatRequest, max_tokens: int, guide: Guide | None = None
) -> GenerationParams:
    """What the engine is asked for besides the prompt (benchmarks send the same)."""
    return GenerationParams(
        max_tokens=max_tokens,
        end_ids=tuple(tokenizer.eos_token_ids) or (0,),
        pad_id=tokenizer.pad_token_id or 0,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_k=request.top_k or 0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        # Triton's seed is a uint64; clients send any integer (OpenAI's are int64): the same
        # seed still gives the same tokens, and none fails the request.
        seed=None if request.seed is None else request.seed % 2**64,
        top_logprobs=request.top_logprobs,
        guide_type=None if guide is None else guide.type.value,
        guide=None if guide is None else guide.text,
        priority=request.priority,
    )


async def count_prompt_tokens(fleet: Fleet, request: ChatRequest) -> int:
    """The prompt's size exactly as `generate` would send it (template, tools, instructions);
    also for prompts too long to serve, so clients can decide to compact them."""
    entry = chat_model(fleet, request.model)
    tokenizer = await fleet.tokenizer(entry.profile.name)
    return len(await render(tokenizer, request, _harmony(entry)))


def _harmony(entry: CatalogueEntry) -> bool:
    return entry.profile.tool_call_format is ToolCallFormat.HARMONY


def think_splitter(
    entry: CatalogueEntry, tokenizer: ModelTokenizer, request: ChatRequest, prompt: list[int]
) -> ThinkSplitter | None:
    """The `<think>` splitter for a model that writes its reasoning inline (the catalogue's
    `reasoning`, or its chat template when that is "auto"); None for harmony models (their
    parser splits), a raw completion (its text is returned as written) and other models."""
    setting = entry.profile.reasoning
    if _harmony(entry) or request.raw_prompt is not None or setting is ReasoningFormat.NONE:
        return None
    if setting is ReasoningFormat.AUTO and not template_reasons(tokenizer.chat_template):
        return None
    return ThinkSplitter(starts_inside=prompt_opens_reasoning(tokenizer.decode(prompt[-8:])))


async def generate(
    fleet: Fleet, metrics: GatewayMetrics, request: ChatRequest, api: str
) -> AsyncGenerator[Event, None]:
    record = RequestRecord(request.request_id, api, request.model)
    logs.request_id.set(request.request_id)  # neuron calls and log lines made for it carry it
    client = keys.client.get()
    try:
        if client is not None:  # the key's models, before anything is fetched for the model
            client.check_model(request.model, fleet.resolve(request.model).profile.name)
        prepared = await prepare(fleet, request)
        # Nothing beyond the key's limits reaches a node: admitted here or refused with 429.
        ticket = client.admit(len(prepared.prompt)) if client is not None else None
    except CortexError as error:
        record.refused(metrics, error.kind)
        raise
    if client is not None and client.priority is not KeyPriority.INTERACTIVE:
        request = replace(request, priority=ENGINE_PRIORITY[client.priority])
    try:
        async for event in _generate(fleet, metrics, request, record, prepared):
            yield event
    finally:
        if ticket is not None:
            ticket.finish(
                record.prompt_tokens, record.cached_prompt_tokens, record.completion_tokens
            )


def _waiting_class() -> KeyPriority:
    """The class the request waits in for a load or a switch: its key's (maybe lowered)."""
    client = keys.client.get()
    return KeyPriority.INTERACTIVE if client is None else client.priority


async def _generate(
    fleet: Fleet,
    metrics: GatewayMetrics,
    request: ChatRequest,
    record: RequestRecord,
    prepared: Prepared,
) -> AsyncGenerator[Event, None]:
    settings = fleet.config.gateway
    model, prompt = prepared.model, prepared.prompt
    record.model, record.prompt_tokens = model, len(prompt)

    # A warm model is ready at once, so errors here still come before the first event (plain
    # HTTP errors); a cold load announces the request first, then keeps the stream alive.
    # A node that fails before the first token is marked down and the request tried again
    # elsewhere (another replica, or a load on another node) while its deadline allows.
    affinity = conversation_key(request)
    node = fleet.ready_replica(model, affinity) or ""
    announced = False
    deadline: float | None = None
    for attempt in range(1, ATTEMPTS + 1):
        if not node:
            try:
                async with contextlib.aclosing(
                    Paced(
                        _once(fleet.ensure_ready(model, affinity, _waiting_class())),
                        settings.ping_interval_s,
                    )
                ) as readiness:
                    async for result in readiness:
                        if result is None:
                            if not announced:
                                announced = True
                                yield Started(model, len(prompt))
                            yield Waiting()
                        else:
                            node = result
            except CortexError as error:
                record.refused(metrics, error.kind)
                raise
        if deadline is None:  # the generation's time counts from when its model is ready
            metrics.queue_wait.labels(model).observe(time.monotonic() - record.started)
            deadline = time.monotonic() + settings.request_timeout_s
        record.node = node
        failed = None
        async with contextlib.aclosing(
            _stream(
                fleet,
                metrics,
                request,
                prepared,
                record,
                node,
                deadline,
                may_retry=attempt < ATTEMPTS,
            )
        ) as events:
            async for event in events:
                if isinstance(event, _Retry):
                    failed = event
                    break
                if isinstance(event, Started):
                    if announced:
                        continue
                    announced = True
                yield event
        if failed is None:
            return
        log.warning(
            "request %s: %s failed on %s before its first token (%s); trying again",
            request.request_id,
            model,
            node,
            failed.error.message,
        )
        # A model that left the node (unloaded, its engine retired) is looked for elsewhere; a
        # node that failed is marked down. A fresh look at the node tells the two apart.
        if isinstance(failed.error, NodeUnavailable) or not await fleet.model_left(node, model):
            fleet.node_failed(node, failed.error.message)
        node = ""


@dataclass(frozen=True)
class _Retry:
    """`_stream`'s word that the node failed before any token: try another."""

    error: CortexError


async def _stream(
    fleet: Fleet,
    metrics: GatewayMetrics,
    request: ChatRequest,
    prepared: Prepared,
    record: RequestRecord,
    node: str,
    deadline: float,
    may_retry: bool,
) -> AsyncGenerator[Event | _Retry, None]:
    """One attempt on one node: its events, or `_Retry` if the node failed before the first
    token while the deadline leaves time to try elsewhere (unless this is the last try)."""
    settings = fleet.config.gateway
    model, prompt, tokenizer = prepared.model, prepared.prompt, prepared.tokenizer
    series = metrics.series(model, node, record.api)
    params = generation_params(tokenizer, request, prepared.max_tokens, prepared.guide)
    output = Output(
        tokenizer.stream_decoder(),
        StopMatcher(request.stop),
        parser_for(
            prepared.entry.profile.tool_call_format.value,
            bool(request.tools),
            request.parallel_tool_calls,
            tokenizer.harmony() if _harmony(prepared.entry) else None,
            request.tools,
        ),
        len(prompt),
        prepared.max_tokens,
        think_splitter(prepared.entry, tokenizer, request, prompt),
    )
    if prepared.entry.profile.engine is EngineKind.TRTLLM:
        params = replace(params, return_perf_metrics=True)  # its prefix-cache reuse
    retry: _Retry | None = None
    pending: list[TokenLogprob] = []  # logprobs for the next text delta
    announced = False  # generate() passes on the first Started of all attempts only
    series.in_flight.inc()
    try:
        async with fleet.using(node, model) as triton:
            stream = triton.generate(model, prompt, params, request.request_id)
            try:
                async with contextlib.aclosing(
                    Paced(stream, settings.ping_interval_s, deadline)
                ) as steps:
                    async for tokens in steps:
                        # The stream opens on the engine's first response (the torch engine
                        # sends one on admission, before prefill), which carries the prefix
                        # cache's share of the prompt; on a keep-alive first, without it.
                        cached = min(stream.cached_prompt_tokens or 0, len(prompt))
                        output.cached_prompt_tokens = record.cached_prompt_tokens = cached
                        if not announced:
                            announced = True
                            yield Started(model, len(prompt), cached)
                        if tokens is None:  # a long prefill: keep the client's stream alive
                            yield Waiting()
                            continue
                        if tokens and record.first_token_at is None:
                            record.first_token_at = time.monotonic()
                            series.ttft.observe(record.first_token_at - record.started)
                        if request.top_logprobs is not None:
                            taken = stream.take_logprobs(len(tokens))
                            pending.extend(_logprobs(tokenizer, tokens, taken))
                        for event in output.feed(tokens):
                            if pending and isinstance(event, TextDelta):
                                event, pending = replace(event, logprobs=tuple(pending)), []
                            yield event
                        if output.done:
                            break
            finally:
                await stream.aclose()
        record.outcome = RequestOutcome.OK
        for event in output.finish():
            if pending and isinstance(event, TextDelta | Finished):
                if isinstance(event, Finished):
                    yield TextDelta("", tuple(pending))
                else:
                    event = replace(event, logprobs=tuple(pending))
                pending = []
            yield event
    except (GeneratorExit, asyncio.CancelledError):
        record.outcome = RequestOutcome.CANCELLED
        raise
    except CortexError as error:
        if not (may_retry and _retryable(error, record, deadline)):
            record.outcome = error.kind
            raise
        retry = _Retry(error)
    except Exception as error:  # a node failing mid-stream ends the stream with an error
        failure = UpstreamFailed(f"{model} on {node} failed: {error}")
        if not (may_retry and _retryable(failure, record, deadline)):
            record.outcome = RequestOutcome.API_ERROR
            raise failure from error
        retry = _Retry(failure)
    finally:
        series.in_flight.dec()
        if retry is None:
            record.completion_tokens = output.completion_tokens
            record.served(series)
    if retry is not None:
        yield retry


def _logprobs(
    tokenizer: ModelTokenizer, tokens: list[int], entries: list[TokenLogprobs]
) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            tokenizer.decode([token]),
            value,
            tuple(TopLogprob(tokenizer.decode([top]), logprob) for top, logprob in tops),
        )
        for token, (value, tops) in zip(tokens, entries, strict=False)
    ]


def _retryable(error: CortexError, record: RequestRecord, deadline: float) -> bool:
    """Before the first token, a failed node or a model that left it is worth another try."""
    return (
        record.first_token_at is None
        and isinstance(error, UpstreamFailed | ModelNotFound)
        and time.monotonic() < deadline
    )


async def collect(
    events: AsyncIterator[Event],
    logprobs: list[TokenLogprob] | None = None,
    reasoning: list[str] | None = None,
) -> tuple[str, list[tuple[str, str, str]], Finished]:
    """A whole answer: (text, [(call id, name, arguments)], finish) for non-streaming replies;
    the tokens' logprobs are added to `logprobs` and the model's reasoning to `reasoning`, when
    given."""
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
            if logprobs is not None:
                logprobs.extend(event.logprobs)
        elif isinstance(event, ReasoningDelta):
            if reasoning is not None:
                reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = [event.id, event.name, ""]
        elif isinstance(event, ToolCallDelta):
            calls[event.index][2] += event.arguments
        elif isinstance(event, Finished):
            finished = event
    if finished is None:
        raise UpstreamFailed("the stream ended without a result")
    return "".join(text), [(c[0], c[1], c[2]) for c in calls.values()], finished
