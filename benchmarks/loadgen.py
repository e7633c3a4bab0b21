"""The load generator: closed-loop streaming clients, run in a process of their own so their
event loop does not share a GIL with the orchestrating script.

A `Job` is `concurrency` streams, each a connection that sends `requests_per_stream` requests
one after the other (after one unrecorded warm-up request per stream, which also opens the
connection). Three ways to send the same request:

- `direct`: Triton's gRPC stream with the token-id payload the gateway would send (the gateway's
  own `TritonStream`, so this is the cheapest client cortex has);
- `openai` / `anthropic`: the gateway's streaming endpoints over raw HTTP/1.1 keep-alive sockets
  (no SDK, no httpx: the client should cost little), the SSE body read chunk by chunk.

Time to first token is taken at the first chunk that carries content (a `content` delta, a
`text_delta`), total time at the end of the chunked body (or Triton's final response).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field

import uvloop

from control_plane.node_client import GenerationParams, TritonStream

# The first bytes of an event that carries generated text, per dialect.
CONTENT_MARKERS = {"openai": b'{"content":"', "anthropic": b'"text_delta"'}
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@dataclass(frozen=True)
class Job:
    mode: str  # direct | openai | anthropic
    concurrency: int
    requests_per_stream: int
    # direct
    triton_grpc: str = ""
    model: str = ""
    prompt: tuple[int, ...] = ()
    params: GenerationParams | None = None
    # gateway
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = ""
    body: bytes = b""
    warm_up: bool = True
    # Streams start spread over this many seconds (one request's length spreads arrivals out:
    # closed-loop streams that start together keep arriving in bursts). Jobs that share one
    # load between client processes take a phase each, so their starts interleave.
    stagger_s: float = 0.0
    stagger_phase: float = 0.0


@dataclass
class Result:
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0

    def merge(self, other: Result) -> None:
        self.ttft_s += other.ttft_s
        self.total_s += other.total_s
        self.tokens += other.tokens
        self.errors += other.errors
        self.wall_s = max(self.wall_s, other.wall_s)
        self.client_cpu_s += other.client_cpu_s


class HttpFailure(Exception):
    pass


class _Connection:
    """One keep-alive HTTP/1.1 connection that streams chunked SSE responses."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST {PATHS[job.mode]} HTTP/1.1\r\n"
            f"host: {job.host}:{job.port}\r\n"
            "content-type: application/json\r\n"
            "accept: text/event-stream\r\n"
            f"x-api-key: {job.api_key}\r\n"
            "anthropic-version: 2023-06-01\r\n"
            f"content-length: {len(job.body)}\r\n\r\n"
        ).encode() + job.body
        self.marker = CONTENT_MARKERS[job.mode]

    async def request(self) -> tuple[float | None, float, int]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.job.host, self.job.port)
        reader = self.reader
        assert reader is not None
        started = time.perf_counter()
        self.writer.write(self.head)
        header = await reader.readuntil(b"\r\n\r\n")
        if not header.startswith(b"HTTP/1.1 200"):
            raise HttpFailure(header.split(b"\r\n", 1)[0].decode(errors="replace"))
        first: float | None = None
        count = 0
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await reader.readexactly(2)
                break
            data = await reader.readexactly(size + 2)
            found = data.count(self.marker)
            if found and first is None:
                first = time.perf_counter()
            count += found
        ended = time.perf_counter()
        return (None if first is None else first - started), ended - started, count

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _direct(
    stream: TritonStream, job: Job, request_id: str
) -> tuple[float | None, float, int]:
    assert job.params is not None
    started = time.perf_counter()
    first: float | None = None
    count = 0
    async for tokens in stream.generate(job.model, list(job.prompt), job.params, request_id):
        if tokens and first is None:
            first = time.perf_counter()
        count += len(tokens)
    return (None if first is None else first - started), time.perf_counter() - started, count


async def _run(job: Job) -> Result:
    result = Result()
    triton = TritonStream(job.triton_grpc) if job.mode == "direct" else None
    connections = [_Connection(job) for _ in range(job.concurrency)] if triton is None else []

    async def one(worker: int, number: int, record: bool) -> None:
        try:
            if triton is not None:
                request_id = f"bench-{os.getpid()}-{worker}-{number}"
                ttft, total, tokens = await _direct(triton, job, request_id)
            else:
                ttft, total, tokens = await connections[worker].request()
        except Exception as error:
            result.errors.append(f"{error.__class__.__name__}: {error}")
            if triton is None:  # a broken connection is reopened for the next request
                connections[worker].close()
                connections[worker] = _Connection(job)
            return
        if record:
            if ttft is None:
                result.errors.append("no content token")
                return
            result.ttft_s.append(ttft)
            result.total_s.append(total)
            result.tokens.append(tokens)

    async def worker(index: int) -> None:
        await asyncio.sleep(job.stagger_s * (index + job.stagger_phase) / job.concurrency)
        for number in range(job.requests_per_stream):
            await one(index, number, record=True)

    try:
        if job.warm_up:
            await asyncio.gather(*(one(i, -1, record=False) for i in range(job.concurrency)))
            result.errors.clear()
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(job.concurrency)))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu
    finally:
        for connection in connections:
            connection.close()
        if triton is not None:
            await triton.close()
    return result


def split(job: Job, parts: int) -> list[Job]:
    """One load shared between `parts` client processes, their stream starts interleaved."""
    parts = max(1, min(parts, job.concurrency))
    sizes = [
        job.concurrency // parts + (1 if i < job.concurrency % parts else 0) for i in range(parts)
    ]
    return [
        dataclasses.replace(job, concurrency=size, stagger_phase=i / parts)
        for i, size in enumerate(sizes)
    ]


def run_job(job: Job) -> Result:
    """Entry point in the client process (uvloop, as the gateway's Sanic uses)."""
    return uvloop.run(_run(job))
