"""Where a cached Claude Code turn's gateway time goes, stage by stage, on CPU (issue 31).

    python -m benchmarks.long_prompt_profile           # turns 2-10 of 3 conversations
    python -m benchmarks.long_prompt_profile --quick   # turns 2-4 of 1 conversation

The requests are benchmarks/claude_code_trace.py's (the same bodies `prefix_cache.py` sends:
turn 10 is ~80 kB of JSON, ~77k characters of prompt, ~21k ids on cortex-tiny's tokenizer).
Each stage the gateway runs for a turn is timed on its own, in this process, in the order the
gateway runs them: JSON body → wire model (with the lone-surrogate scan) → canonical request →
template text → token ids → the gRPC request to Triton (protobuf with the ids). Tokenization is
timed twice in the same run: the whole prompt (as before issue 31) and through the
conversation's `PromptMemo` after its previous turn (what the gateway does now). What this
does not time: Triton's gRPC hop and the stub's reading of the ids (they need a server:
`prefix_cache.py` measures the whole), and the engine.

Reported: per stage, the median over turns and the spread of 3 repeats (each repeat a fresh
tokenizer and memo). Results: benchmarks/results/long_prompt_profile[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.claude_code_trace import Conversation
from benchmarks.render_stall import tokenizer_files
from control_plane import wire
from control_plane.anthropic.protocol import MessagesRequest
from control_plane.anthropic.translate import chat_request
from control_plane.node_client import build_request
from control_plane.prompting import ModelTokenizer, template_inputs
from control_plane.routing import conversation_key

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = (
    "json",
    "validate",
    "translate",
    "template",
    "tokenize_whole",
    "tokenize_memo",
    "grpc_request",
)


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return 1000 * (time.perf_counter() - start), result


def profile_turns(conversations: int, turns: int) -> dict[str, list[float]]:
    tokenizer = ModelTokenizer(tokenizer_files())
    from control_plane.generation import generation_params

    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for session in range(conversations):
        conversation = Conversation(session)
        for turn in range(1, turns + 1):
            raw = json.dumps(conversation.request(turn)).encode()
            laps: dict[str, float] = {}
            laps["json"], body = timed(lambda raw=raw: json.loads(raw))  # type: ignore[misc]

            def validate(body: Any = body) -> MessagesRequest:
                wire.unencodable(body)
                return MessagesRequest.model_validate(body)

            laps["validate"], model = timed(validate)
            laps["translate"], request = timed(lambda m=model: chat_request(m, "r"))  # type: ignore[misc]

            def template(request: Any = request) -> str:
                messages, tools, _ = template_inputs(request)
                return str(
                    tokenizer.tokenizer.apply_chat_template(
                        messages, tools=tools, add_generation_prompt=True, tokenize=False
                    )
                )

            laps["template"], text = timed(template)
            laps["tokenize_whole"], whole = timed(
                lambda t=text: list(  # type: ignore[misc]
                    tokenizer.backend.encode_batch([t], add_special_tokens=False)[0].ids
                )
            )
            assert tokenizer.memo is not None
            key = conversation_key(request)
            assert key is not None
            laps["tokenize_memo"], ids = timed(lambda t=text, k=key: tokenizer.memo.encode(k, t))  # type: ignore[misc]  # a lambda with defaults
            assert ids == whole, "the memo must give the whole encode's ids"
            params = generation_params(tokenizer, request, 256)
            laps["grpc_request"], _ = timed(
                lambda i=ids, p=params: build_request("m", i, p, "r").SerializeToString()  # type: ignore[misc]
            )
            if turn > 1:  # cached turns: the conversation's previous prompt was rendered
                for stage, value in laps.items():
                    times[stage].append(value)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    conversations, turns = (1, 4) if args.quick else (3, 10)
    repeats = []
    for repeat in range(3):
        times = profile_turns(conversations, turns)
        medians = {stage: statistics.median(values) for stage, values in times.items()}
        repeats.append(medians)
        print(
            f"repeat {repeat}: "
            + ", ".join(f"{stage} {value:.2f}" for stage, value in medians.items())
            + " ms (medians over turns)",
            flush=True,
        )
    before = [r["json"] + r["validate"] + r["translate"] + r["template"] for r in repeats]
    summary = {
        "gateway_ms_before": [
            b + r["tokenize_whole"] + r["grpc_request"]
            for b, r in zip(before, repeats, strict=True)
        ],
        "gateway_ms_after": [
            b + r["tokenize_memo"] + r["grpc_request"] for b, r in zip(before, repeats, strict=True)
        ],
    }
    print(
        "gateway stages, whole-prompt tokenizing: "
        + " / ".join(f"{v:.1f}" for v in summary["gateway_ms_before"])
        + " ms; with the memo: "
        + " / ".join(f"{v:.1f}" for v in summary["gateway_ms_after"])
        + " ms"
    )
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "conversations": conversations,
        "turns": turns,
        "repeats": repeats,
        **summary,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "long_prompt_profile-quick.json" if args.quick else "long_prompt_profile.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
