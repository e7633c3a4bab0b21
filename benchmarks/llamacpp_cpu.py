"""The llamacpp engine on CPU against llama.cpp itself, same file, same threads, same run.

    python -m benchmarks.llamacpp_cpu            # 3 repetitions
    python -m benchmarks.llamacpp_cpu --quick    # 1 repetition

Three ways to serve SmolLM2-135M-Instruct's Q4_1 GGUF (the embedded default's `smollm2-135m`),
each with 2 threads and flash attention on (llama.cpp's own "auto" on a CPU; the engine's
setting):

- **cortex**: gateway + neuron + tritonserver + the llamacpp engine (`cortex serve --config`,
  OpenAI chat completions, streamed), max_batch_size 8;
- **standalone**: llama-cpp-python's own generation loop (`Llama.create_chat_completion`,
  streamed) in a process of its own, one sequence at a time;
- **llama_cpp.server**: `python -m llama_cpp.server`, llama-cpp-python's OpenAI server (the
  served peer), in a virtual environment of its own with its `[server]` extras (made once under
  the model cache from pip's cached wheel).

Measured for each: decode tokens/s of one stream (completion tokens after the first / time
after the first), aggregate tokens/s of 4 and 8 streams at once (all completion tokens / wall
time), time to first token of a ~2k-token prompt the server has not seen (cold) and of the same
2k-token prefix with a new question (cached), load to first token (process or model start to
the first token of a first request), and the RSS of what holds the model. Greedy, 128 tokens per
stream. The machine is shared: each phase records how many cores other processes kept busy.
Results go to benchmarks/results/llamacpp_cpu[-quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.harness import Neighbours, bench_gateway, bench_neuron, machine
from cortex.config import ModelProfile
from cortex.demo.cache import models_root
from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from cortex.launch import free_ports, stop

THREADS = 2
TOKENS = 128
CONTEXT = 8192
RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = [
    "a lighthouse",
    "a river",
    "a clock",
    "a forest",
    "a train",
    "a garden",
    "a ship",
    "a city",
]
SERVER_VENV = models_root().parent / "llama-server-venv"


def story(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {topic}."}]


def long_prefix() -> str:
    """About 2,000 tokens of system prompt that no server has seen."""
    return f"Session {uuid.uuid4().hex}. " + "Answer with care and cite the notes. " * 250


# ---------------------------------------------------------------------------------------------
# One OpenAI-compatible streaming client for cortex and llama_cpp.server


def stream_chat(
    url: str, model: str, messages: list[dict[str, str]], max_tokens: int, headers: dict[str, str]
) -> tuple[float, float, int]:
    """(seconds to the first content, seconds to the end, completion tokens) of one streamed
    chat completion; tokens from the usage where the server gives it, else content chunks."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, chunks, usage = 0.0, 0, None
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if not first:
                        first = time.perf_counter() - started
    return first, time.perf_counter() - started, usage if usage is not None else chunks


def served(url: str, model: str, headers: dict[str, str], repetitions: int) -> dict[str, Any]:
    """Every measurement but load and RSS against one OpenAI-compatible server."""
    result: dict[str, Any] = {}
    watch = Neighbours()
    rates = []
    for _ in range(repetitions):
        first, total, tokens = stream_chat(url, model, story(TOPICS[0]), TOKENS, headers)
        rates.append((tokens - 1) / (total - first))
    result["decode_1_stream_tok_s"] = rates
    for streams in (4, 8):
        aggregates = []
        for _ in range(repetitions):
            counts: list[int] = []

            def one(topic: str, counts: list[int] = counts) -> None:
                counts.append(stream_chat(url, model, story(topic), TOKENS, headers)[2])

            started = time.perf_counter()
            threads = [threading.Thread(target=one, args=(t,)) for t in TOPICS[:streams]]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            aggregates.append(sum(counts) / (time.perf_counter() - started))
        result[f"aggregate_{streams}_streams_tok_s"] = aggregates
    cold, cached = [], []
    for _ in range(repetitions):
        prefix = long_prefix()
        hello = [{"role": "system", "content": prefix}, {"role": "user", "content": "Hello."}]
        cold.append(stream_chat(url, model, hello, 1, headers)[0])
        again = [{"role": "system", "content": prefix}, {"role": "user", "content": "And now?"}]
        cached.append(stream_chat(url, model, again, 1, headers)[0])
    result["ttft_cold_2k_s"] = cold
    result["ttft_cached_2k_s"] = cached
    result["neighbour_cores"] = round(watch.cores(), 2)
    return result


# ---------------------------------------------------------------------------------------------
# cortex


def cortex(folder: Path, repetitions: int) -> dict[str, Any]:
    model_folder = ensure_smollm2()
    profile = ModelProfile(
        name="smollm2",
        source=str(gguf_path(model_folder)),
        tokenizer=str(model_folder),
        context_length=CONTEXT,
        kv_cache_tokens=2 * CONTEXT,
        max_batch_size=8,
    )
    os.environ["CORTEX_LLAMACPP_THREADS"] = str(THREADS)
    with bench_neuron(folder / "node", [profile]) as neuron, bench_gateway(folder, neuron) as gw:
        headers = {"authorization": f"Bearer {gw.api_key}"}
        # A first request builds the gateway's tokenizer (transformers' import, once per
        # gateway) and loads the model; unloaded again, the next request times the load alone.
        stream_chat(gw.url, "smollm2", story("a warm-up"), 1, headers)
        httpx.post(f"{neuron.url}/models/unload", json={"model": "smollm2"}, timeout=120)
        deadline = time.monotonic() + 60
        while httpx.get(f"{neuron.url}/status", timeout=10).json()["loaded"]:
            if time.monotonic() > deadline:
                raise RuntimeError("smollm2 did not unload")
            time.sleep(0.1)
        started = time.perf_counter()
        while True:
            try:
                stream_chat(gw.url, "smollm2", story("a cold start"), 1, headers)
                break
            except httpx.HTTPStatusError:  # the gateway's poll has not seen the unload yet
                time.sleep(0.1)
        load_to_first = time.perf_counter() - started
        status = httpx.get(f"{neuron.url}/status", timeout=10).json()
        loaded = status["loaded"][0]
        result = served(gw.url, "smollm2", headers, repetitions)
        after = httpx.get(f"{neuron.url}/status", timeout=10).json()["loaded"][0]
        result.update(
            load_to_first_token_s=[load_to_first],
            triton_load_s=loaded["load_seconds"],
            rss_mib=after["memory_bytes"] / 2**20,
            estimated_mib=after["estimated_bytes"] / 2**20,
        )
        return result


# ---------------------------------------------------------------------------------------------
# llama.cpp standalone, in a process of its own


STANDALONE = """
import json, sys, time, uuid
import psutil
started = time.perf_counter()
from llama_cpp import Llama
path, threads, context, tokens, repetitions, prefix_text = sys.argv[1:7]
llm = Llama(path, n_ctx=int(context), n_threads=int(threads), flash_attn=True, verbose=False)
def chat(messages, max_tokens):
    begun = time.perf_counter(); first = 0.0; count = 0
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0,
                                            stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
            first = first or time.perf_counter() - begun
    return first, time.perf_counter() - begun, count
story = [{"role": "user", "content": "Write a long story about a cold start."}]
first, _, _ = chat(story, 1)
result = {"load_to_first_token_s": [time.perf_counter() - started]}
rates = []
for _ in range(int(repetitions)):
    first, total, count = chat([{"role": "user", "content": "Write a long story about a lighthouse."}], int(tokens))
    rates.append((count - 1) / (total - first))
result["decode_1_stream_tok_s"] = rates
cold, cached = [], []
for _ in range(int(repetitions)):
    prefix = f"Session {uuid.uuid4().hex}. " + prefix_text
    cold.append(chat([{"role": "system", "content": prefix}, {"role": "user", "content": "Hello."}], 1)[0])
    cached.append(chat([{"role": "system", "content": prefix}, {"role": "user", "content": "And now?"}], 1)[0])
result["ttft_cold_2k_s"] = cold
result["ttft_cached_2k_s"] = cached
result["rss_mib"] = psutil.Process().memory_info().rss / 2**20
print(json.dumps(result))
"""


def standalone(repetitions: int) -> dict[str, Any]:
    watch = Neighbours()
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            STANDALONE,
            str(gguf_path(ensure_smollm2())),
            str(THREADS),
            str(CONTEXT),
            str(TOKENS),
            str(repetitions),
            "Answer with care and cite the notes. " * 250,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    result["neighbour_cores"] = round(watch.cores(), 2)
    return result


# ---------------------------------------------------------------------------------------------
# python -m llama_cpp.server


def server_python() -> Path:
    """A virtual environment with llama-cpp-python[server], made once (the wheel pip built for
    the project's install comes from pip's cache)."""
    python = SERVER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(SERVER_VENV)], check=True)
        from importlib.metadata import version

        subprocess.run(
            [
                str(SERVER_VENV / "bin" / "pip"),
                "install",
                "--quiet",
                f"llama-cpp-python[server]=={version('llama-cpp-python')}",
                "numpy==1.26.4",
            ],
            check=True,
        )
    return python


@contextlib.contextmanager
def llama_server(folder: Path) -> Iterator[tuple[str, psutil.Process, float]]:
    """The server, yielded with its URL, process and seconds from its start to a first token."""
    port = free_ports(1)[0]
    log = open(folder / "llama_server.log", "w")  # noqa: SIM115 - closed below
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            str(server_python()),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf_path(ensure_smollm2())),
            "--model_alias",
            "smollm2",
            "--n_threads",
            str(THREADS),
            "--n_threads_batch",
            str(THREADS),
            "--n_ctx",
            str(CONTEXT),
            "--flash_attn",
            "true",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                stream_chat(url, "smollm2", story("a cold start"), 1, {})
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError(f"llama_cpp.server did not start: see {log.name}") from None
                time.sleep(0.05)
        yield url, psutil.Process(process.pid), time.perf_counter() - started
    finally:
        stop(process)
        log.close()


def llama_cpp_server(folder: Path, repetitions: int) -> dict[str, Any]:
    with llama_server(folder) as (url, process, load_to_first):
        result = served(url, "smollm2", {}, repetitions)
        result.update(
            load_to_first_token_s=[load_to_first],
            rss_mib=process.memory_info().rss / 2**20,
        )
        return result


# ---------------------------------------------------------------------------------------------


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def median(values: Any) -> float:
        return float(statistics.median(values)) if isinstance(values, list) else float(values)

    cortex_result, alone = results["cortex"], results["standalone"]
    one = median(cortex_result["decode_1_stream_tok_s"])
    return {
        "decode_1_stream_vs_standalone": one / median(alone["decode_1_stream_tok_s"]),
        "aggregate_8_vs_1_stream": median(cortex_result["aggregate_8_streams_tok_s"]) / one,
        "load_to_first_token_s": median(cortex_result["load_to_first_token_s"]),
        "ttft_cached_2k_s": median(cortex_result["ttft_cached_2k_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition")
    args = parser.parse_args()
    repetitions = 1 if args.quick else 3
    runs: dict[str, Callable[[Path], dict[str, Any]]] = {
        "standalone": lambda _folder: standalone(repetitions),
        "llama_cpp_server": lambda folder: llama_cpp_server(folder, repetitions),
        "cortex": lambda folder: cortex(folder, repetitions),
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as folder:
        for name, run in runs.items():
            print(f"== {name}", flush=True)
            results[name] = run(Path(folder))
            print(json.dumps(results[name], indent=1), flush=True)
    report = {
        "machine": machine(),
        "threads": THREADS,
        "tokens_per_stream": TOKENS,
        "results": results,
        "summary": summary(results),
    }
    print(json.dumps(report["summary"], indent=1))
    RESULTS.mkdir(exist_ok=True)
    name = "llamacpp_cpu-quick.json" if args.quick else "llamacpp_cpu.json"
    (RESULTS / name).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
