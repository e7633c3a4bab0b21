"""Prefix caching on Claude Code traffic: time to first token per turn, cache on vs off, and the
cached prompt tokens the gateway reports against the prefix that truly repeats.

    python -m benchmarks.prefix_cache             # 3 conversations × 10 turns, cortex-tiny, CPU
    python -m benchmarks.prefix_cache --quick     # 1 conversation × 3 turns, a quarter the size
    python -m benchmarks.prefix_cache --url http://gpu-host:31313 --model llama-8b \\
        --model-off llama-8b-nocache --tokenizer /models/llama-8b   # a fleet already running

The trace is benchmarks/claude_code_trace.py: Claude-Code-shaped `POST /v1/messages` bodies
(billing header, 12 tools, system prompt, mid-conversation system message — ~15.6k prompt
tokens on cortex-tiny's tokenizer at turn 1, most of it shared by every conversation), each
later turn appending an assistant turn with a tool call and a user turn with its result (~800
tokens). Conversations run one after another, as one developer's sessions would; each turn is
sent to the cache-off model, then to the cache-on one, so both see the same machine load.
Requests stream with a small `max_tokens` (the trace's prompts are what is measured); time to
first token is from sending the request to its first `text_delta` (or, for a request that
decoded no text, to its `message_delta`: a random-weight model served with a tokenizer not its
own, as on the GPU, is run with `--max-tokens 1`, where that is the first token).

Without `--url` the fleet is started here from this checkout: one neuron (its own tritonserver,
the torch engine on CPU) serving cortex-tiny twice, `prefix_caching = true` and `false`, and a
gateway in front of it. With `--url` it is the operator's: `--model` must be served with prefix
caching and `--model-off` without (a second models.toml entry with `prefix_caching = false`).

"True" reuse is computed from the prompts' token ids (the gateway's own renderer over the
model's tokenizer: `--tokenizer` folder, or cortex-tiny's): the longest prefix a turn shares
with any earlier prompt sent to that model, in whole 16-token blocks (the torch engine's) and
never its last token. Target (CPU, cortex-tiny): TTFT of turns 2–10 ≤ 15 % of cache-off.
Results go to benchmarks/results/prefix_cache[-quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.claude_code_trace import Conversation
from control_plane.anthropic.protocol import MessagesRequest
from control_plane.anthropic.translate import chat_request
from control_plane.prompting import ModelTokenizer
from cortex.config import ModelProfile
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.neuron_api import TokenizerFiles

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str
    model_on: str
    model_off: str


def models(source: Path, kv_cache_tokens: int) -> list[ModelProfile]:
    return [
        ModelProfile(
            name=name,
            source=str(source),
            context_length=32768,
            kv_cache_tokens=kv_cache_tokens,
            max_batch_size=4,
            prefix_caching=caching,
        )
        for name, caching in (("cortex-tiny", True), ("cortex-tiny-nocache", False))
    ]


@contextlib.contextmanager
def local_fleet(kv_cache_tokens: int) -> Iterator[Target]:
    # Here, not at the top: the harness needs packages the GPU image lacks (psutil), and the
    # GPU run passes --url.
    from benchmarks.harness import bench_gateway, bench_neuron

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cortex-prefix-")))
        neuron = stack.enter_context(
            bench_neuron(folder, models(ensure_tiny_model(), kv_cache_tokens))
        )
        gateway = stack.enter_context(bench_gateway(folder, neuron))
        yield Target(gateway.url, gateway.api_key, "cortex-tiny", "cortex-tiny-nocache")


def describe_machine() -> dict[str, str]:
    """What the numbers were measured on (`benchmarks.harness.machine`). With `--url` this may
    run where the harness cannot be imported (the GPU image has no psutil): there,
    what this interpreter can say."""
    try:
        from benchmarks.harness import machine
    except ImportError as error:
        return {
            "python": platform.python_version(),
            "cores": str(os.cpu_count()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "harness": f"not importable here ({error})",
        }
    return machine()


def load_tokenizer(folder: Path) -> ModelTokenizer:
    files = {n: (folder / n).read_text() for n in TOKENIZER_FILES if (folder / n).exists()}
    return ModelTokenizer(
        TokenizerFiles(
            model="bench", files=files, context_length=1 << 20, eos_token_ids=[], pad_token_id=None
        )
    )


def reusable(earlier: list[int], later: list[int]) -> int:
    shared = 0
    for a, b in zip(earlier, later[:-1], strict=False):
        if a != b:
            break
        shared += 1
    return shared // BLOCK * BLOCK


def send(client: httpx.Client, target: Target, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: TTFT and the usage of message_start and the final message_delta.

    TTFT is taken at the first `text_delta`. Tokens that decode to no text (a random-weight
    model with a tokenizer not its own: most of the 8B shape's ids are beyond cortex-tiny's
    vocabulary) send no event, so a request without text is timed at its `message_delta` —
    its first token only when `max_tokens` is 1."""
    started = time.perf_counter()
    ttft: float | None = None
    ended: float | None = None
    start_usage: dict[str, Any] = {}
    final_usage: dict[str, Any] = {}
    headers = {"x-api-key": target.api_key, "anthropic-version": "2023-06-01"}
    with client.stream("POST", f"{target.url}/v1/messages", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code}: {reply.read()[:300]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"] == "message_start":
                start_usage = event["message"]["usage"]
            elif event["type"] == "content_block_delta" and ttft is None:
                ttft = time.perf_counter() - started
            elif event["type"] == "message_delta":
                final_usage = event["usage"]
                ended = time.perf_counter() - started
            elif event["type"] == "error":
                raise RuntimeError(str(event))
    return {
        "ttft_s": ttft if ttft is not None else (ended or time.perf_counter() - started),
        "ttft_at": "text_delta" if ttft is not None else "message_delta",
        "prompt_tokens": start_usage.get("input_tokens", 0)
        + start_usage.get("cache_read_input_tokens", 0),
        "cached_start": start_usage.get("cache_read_input_tokens", 0),
        "cached_final": final_usage.get("cache_read_input_tokens", 0),
    }


def run(
    target: Target,
    tokenizer: ModelTokenizer | None,
    conversations: int,
    turns: int,
    scale: float,
    append_chars: int,
    max_tokens: int,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    history: dict[str, list[list[int]]] = {target.model_on: [], target.model_off: []}
    with httpx.Client(timeout=900) as client:
        # Warm both models (load, tokenizer) with a request outside the trace.
        for model in (target.model_off, target.model_on):
            send(
                client,
                target,
                {
                    "model": model,
                    "max_tokens": 1,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hello"}],
                },
            )
        for number in range(1, conversations + 1):
            traces = {
                model: Conversation(
                    number, model, max_tokens, scale=scale, append_chars=append_chars
                )
                for model in (target.model_off, target.model_on)
            }
            for turn in range(1, turns + 1):
                row: dict[str, Any] = {"conversation": number, "turn": turn}
                for label, model in (("off", target.model_off), ("on", target.model_on)):
                    body = traces[model].request(turn)
                    result = send(client, target, body)
                    if tokenizer is not None:
                        ids = tokenizer.render(
                            chat_request(MessagesRequest.model_validate(body), "b")
                        )
                        result["true_reusable"] = max(
                            (reusable(earlier, ids) for earlier in history[model]), default=0
                        )
                        history[model].append(ids)
                    row[label] = result
                row["ratio"] = row["on"]["ttft_s"] / row["off"]["ttft_s"]
                rows.append(row)
                on, off = row["on"], row["off"]
                print(
                    f"conversation {number} turn {turn:2d}: prompt {on['prompt_tokens']:6d} | "
                    f"off {off['ttft_s'] * 1000:8.1f} ms | on {on['ttft_s'] * 1000:8.1f} ms "
                    f"({row['ratio'] * 100:5.1f} %) | cached {on['cached_start']:6d}"
                    + (f" true {on['true_reusable']:6d}" if "true_reusable" in on else ""),
                    flush=True,
                )
    later = [r for r in rows if r["turn"] >= 2]
    ratios = sorted(r["ratio"] for r in later)
    summary: dict[str, Any] = {
        "turns_2_plus": len(later),
        "ttft_on_ms_median": statistics.median(r["on"]["ttft_s"] for r in later) * 1000,
        "ttft_off_ms_median": statistics.median(r["off"]["ttft_s"] for r in later) * 1000,
        "ratio_median": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "turn_1_on_ms": [r["on"]["ttft_s"] * 1000 for r in rows if r["turn"] == 1],
        "turn_1_off_ms": [r["off"]["ttft_s"] * 1000 for r in rows if r["turn"] == 1],
        "cached_equals_true": all(
            r["on"]["cached_start"] == r["on"].get("true_reusable", r["on"]["cached_start"])
            and r["on"]["cached_start"] == r["on"]["cached_final"]
            for r in rows
        ),
        "cache_off_reports_zero": all(r["off"]["cached_start"] == 0 for r in rows),
        "ttft_at_message_delta": sum(
            r[label]["ttft_at"] == "message_delta" for r in rows for label in ("on", "off")
        ),
        "requests": 2 * len(rows),
    }
    return {"rows": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 conversation × 3 turns, scale 0.25")
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="size of the shared prompt, 1.0 = Claude Code's"
    )
    parser.add_argument("--append-chars", type=int, default=2300, help="characters added per turn")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--kv-cache-tokens", type=int, default=65536, help="local fleet only")
    parser.add_argument(
        "--url", help="a running gateway (http://host:port) instead of a local fleet"
    )
    parser.add_argument("--api-key", default="", help="the gateway's API key (with --url)")
    parser.add_argument("--model", default="cortex-tiny", help="served with prefix caching")
    parser.add_argument(
        "--model-off", default="cortex-tiny-nocache", help="the same model without prefix caching"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="folder with the model's tokenizer files, to compute the true reusable prefix "
        "(default: cortex-tiny's without --url, none with it)",
    )
    parser.add_argument("--out", type=Path, help="where the JSON results go")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns, args.scale = 1, 3, 0.25
        args.append_chars = min(args.append_chars, 1200)
    tokenizer_folder = args.tokenizer or (None if args.url else ensure_tiny_model())
    tokenizer = load_tokenizer(tokenizer_folder) if tokenizer_folder else None
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "api_key")}
    measured_on = describe_machine()  # before the run: nothing after it may lose the results
    with contextlib.ExitStack() as stack:
        if args.url:
            target = Target(args.url.rstrip("/"), args.api_key, args.model, args.model_off)
        else:
            target = stack.enter_context(local_fleet(args.kv_cache_tokens))
        report = run(
            target,
            tokenizer,
            args.conversations,
            args.turns,
            args.scale,
            args.append_chars,
            args.max_tokens,
        )
    report = {
        "machine": measured_on,
        "settings": json.loads(json.dumps(settings, default=str)),
        **report,
    }
    summary = report["summary"]
    print(
        f"turns 2+: on {summary['ttft_on_ms_median']:.1f} ms vs off "
        f"{summary['ttft_off_ms_median']:.1f} ms (median ratio "
        f"{summary['ratio_median'] * 100:.1f} %, spread {summary['ratio_min'] * 100:.1f}–"
        f"{summary['ratio_max'] * 100:.1f} %) | cached = true reuse: "
        f"{summary['cached_equals_true']} | cache off reports 0: "
        f"{summary['cache_off_reports_zero']}"
    )
    if summary["ttft_at_message_delta"] and args.max_tokens > 1:
        print(
            f"note: {summary['ttft_at_message_delta']} of {summary['requests']} requests decoded "
            "no text, so their TTFT is their end: use --max-tokens 1 for such a model"
        )
    out = args.out or RESULTS / f"prefix_cache{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
