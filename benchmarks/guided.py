"""Guided decoding: what the constraint costs per decode step, and what it buys.

    python -m benchmarks.guided [--quick] [--out benchmarks/results/guided_cpu.json]

Runs the torch engine in process (no Triton: the constraint lives in the engine) on
smollm2-135m, CPU unless --device says otherwise.

1. Per-step cost at batch 1 and 32: the same prompts decoded free and under a JSON schema,
   alternating in one run (`--repeats` times each). The engine is stepped from here, and only
   decode steps with the whole batch running are timed (a guided sequence that finishes early
   would otherwise make later steps cheaper). Reported: median ms per step, its spread over the
   repeats, and the constraint's overhead.
2. Schema validity on 50 varied schemas (nested objects, arrays, enums, unions, string formats,
   recursion, patterns, numbers in ranges): each asked for once free (the schema in the prompt,
   JSON extracted as generously as a client would: code fences and text around the object cut
   away) and once constrained; validated with the `jsonschema` package and its format checker.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch
from transformers import AutoTokenizer

from benchmarks.harness import background_cores, machine
from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from cortex.guides import GuideType
from neuron_agent.torch_engine.guided import Guide
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

LIST_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
                "required": ["name", "count"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
DOMAINS = [
    ("person", "name", "city"),
    ("book", "title", "author"),
    ("order", "product", "customer"),
    ("weather report", "city", "summary"),
    ("movie", "title", "director"),
    ("recipe", "dish", "cuisine"),
    ("flight", "airline", "destination"),
    ("song", "title", "artist"),
    ("server", "hostname", "region"),
    ("student", "name", "school"),
]


def shapes(noun: str, first: str, second: str) -> list[dict[str, Any]]:
    """Five schemas about one thing, each exercising other JSON Schema features."""
    flat = {
        "type": "object",
        "properties": {
            first: {"type": "string", "maxLength": 30},
            second: {"type": "string", "maxLength": 30},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "verified": {"type": "boolean"},
        },
        "required": [first, second, "rating", "verified"],
        "additionalProperties": False,
    }
    nested = {
        "type": "object",
        "properties": {
            noun.replace(" ", "_"): flat,
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 4},
            "status": {"enum": ["draft", "active", "archived"]},
        },
        "required": [noun.replace(" ", "_"), "tags", "status"],
        "additionalProperties": False,
    }
    formats = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "created": {"type": "string", "format": "date"},
            "contact": {"type": "string", "format": "email"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        },
        "required": ["id", "created", "contact", "code"],
        "additionalProperties": False,
    }
    union = {
        "type": "object",
        "properties": {
            first: {"type": "string", "maxLength": 30},
            "value": {
                "anyOf": [
                    {"type": "number", "minimum": 0, "maximum": 1000},
                    {"type": "string", "maxLength": 20},
                    {"type": "null"},
                ]
            },
            "kind": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {"unit": {"const": "metric"}},
                        "required": ["unit"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {"unit": {"const": "imperial"}},
                        "required": ["unit"],
                        "additionalProperties": False,
                    },
                ]
            },
        },
        "required": [first, "value", "kind"],
        "additionalProperties": False,
    }
    recursive = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 20},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["label", "children"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "required": ["root"],
        "additionalProperties": False,
    }
    return [flat, nested, formats, union, recursive]


def schemas() -> list[tuple[str, dict[str, Any]]]:
    return [(noun, schema) for noun, a, b in DOMAINS for schema in shapes(noun, a, b)]


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.error: str | None = None

    def emit(self, tokens: list[int], final: bool) -> None:
        self.tokens.extend(tokens)
        if final:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()


def submit(engine: Engine, prompt: list[int], guide: Guide | None, max_new: int) -> Collector:
    collector = Collector()
    engine.submit(
        GenerationRequest(
            prompt=prompt,
            max_new_tokens=max_new,
            emit=collector.emit,
            fail=collector.fail,
            guide=guide,
        )
    )
    return collector


def step_times(engine: Engine, batch: int) -> list[float]:
    """Step the engine until its queue and batch are empty; the seconds of every decode step
    that had the whole batch running."""
    times = []
    while engine.stats()["running"] or engine.stats()["waiting"]:
        running = engine._running
        full = len(running) == batch and not any(s.prefilling for s in running)
        started = time.perf_counter()
        engine.step()
        if full:
            times.append(time.perf_counter() - started)
    return times


def cost(engine: Engine, tokenizer: Any, batch: int, tokens: int, repeats: int) -> dict[str, Any]:
    guide = Guide(GuideType.JSON_SCHEMA, json.dumps(LIST_SCHEMA))
    prompts = [
        prompt_ids(tokenizer, f"List {n + 3} things to pack for a trip, as JSON.")
        for n in range(batch)
    ]
    runs: dict[str, list[float]] = {"free": [], "guided": []}
    for _ in range(repeats):
        for mode in ("free", "guided"):
            for prompt in prompts:
                submit(engine, prompt, guide if mode == "guided" else None, tokens)
            times = step_times(engine, batch)
            if times:
                runs[mode].append(statistics.median(times) * 1000)
    free, guided = statistics.median(runs["free"]), statistics.median(runs["guided"])
    return {
        "batch": batch,
        "free_ms_per_step": runs["free"],
        "guided_ms_per_step": runs["guided"],
        "free_median_ms": free,
        "guided_median_ms": guided,
        "overhead_pct": (guided / free - 1) * 100,
    }


def mask_cost(folder: Path, batch: int, repeats: int) -> dict[str, Any]:
    """The constraint's own CPU work per decode step, without the model: for `batch` guided
    rows, llguidance's masks (its threads) and their application to float32 logits, while
    each row's matcher follows the tokens of a document its schema accepts."""
    from neuron_agent.torch_engine.guided import GuidedBatch, tokenizer_json_guides

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)
    guides = tokenizer_json_guides(folder, vocab, frozenset({tokenizer.eos_token_id}))
    guide = Guide(GuideType.JSON_SCHEMA, json.dumps(LIST_SCHEMA))
    document = json.dumps(
        {"title": "Trip", "items": [{"name": f"item {n}", "count": n} for n in range(12)]},
        separators=(", ", ": "),
    )
    tokens = tokenizer.encode(document, add_special_tokens=False)
    masks = GuidedBatch(batch, vocab)
    logits = torch.zeros(batch, vocab)
    per_step: list[float] = []
    for _ in range(repeats):
        matchers = [guides.matcher(guide) for _ in range(batch)]
        started = time.perf_counter()
        steps = 0
        for token in tokens:
            pending = masks.start([(matcher, row) for row, matcher in enumerate(matchers)])
            assert pending is not None
            masks.apply(pending, list(range(batch)), logits)
            for matcher in matchers:
                if not matcher.consume_token(token):
                    raise RuntimeError(matcher.get_error())
            steps += 1
        per_step.append((time.perf_counter() - started) / steps * 1000)
    masks.close()
    return {"batch": batch, "steps": len(tokens), "ms_per_step": per_step}


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
    )


def extract_json(text: str) -> Any:
    """What a client would do with a free answer: the first {...} span, fences cut away."""
    text = re.sub(r"```(?:json)?", "", text)
    start, end = text.find("{"), text.rfind("}")
    return json.loads(text[start : end + 1] if start >= 0 and end > start else text)


def validity(engine: Engine, tokenizer: Any, max_new: int, limit: int) -> dict[str, Any]:
    cases = schemas()[:limit]
    checker = jsonschema.FormatChecker()
    result: dict[str, Any] = {"schemas": len(cases)}
    for mode in ("free", "guided"):
        collectors = []
        for noun, schema in cases:
            text = (
                f"Return a JSON object describing a {noun} that matches this JSON schema:\n"
                f"{json.dumps(schema)}\nReply with the JSON only."
            )
            guide = Guide(GuideType.JSON_SCHEMA, json.dumps(schema)) if mode == "guided" else None
            collectors.append(submit(engine, prompt_ids(tokenizer, text), guide, max_new))
        if engine._thread is None:
            engine.start()
        valid = finished_valid = cut = 0
        failures: list[str] = []
        for (_noun, schema), collector in zip(cases, collectors, strict=True):
            collector.done.wait(3600)
            answer = tokenizer.decode(collector.tokens, skip_special_tokens=True)
            # An answer that used every token it was allowed was cut, whatever it says.
            was_cut = len(collector.tokens) >= max_new
            cut += was_cut
            try:
                value = json.loads(answer) if mode == "guided" else extract_json(answer)
                jsonschema.validate(value, schema, format_checker=checker)
                valid += 1
                finished_valid += not was_cut
            except (ValueError, jsonschema.ValidationError) as error:
                cause = "cut by max_new: " if was_cut else ""
                failures.append(f"{cause}{type(error).__name__}: {str(error)[:80]}")
        finished = len(cases) - cut
        result[mode] = {
            "valid": valid,
            "rate": valid / len(cases),
            "cut_by_max_new": cut,
            "valid_of_finished": f"{finished_valid}/{finished}",
            "failures": failures[:8],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per cost request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=160, help="tokens per validity answer")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guided_cpu.json"))
    parser.add_argument(
        "--only-masks",
        action="store_true",
        help="only the constraint's own CPU work per step (no model; seconds)",
    )
    parser.add_argument("--only-validity", action="store_true", help="skip the step costs")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.tokens, args.repeats, args.max_new = [1, 4], 8, 1, 24
    folder = ensure_smollm2()
    if args.only_masks:
        rows = [mask_cost(folder, batch, 5) for batch in args.batches]
        for row in rows:
            print(
                f"batch {row['batch']:>2}: masks {[round(x, 2) for x in row['ms_per_step']]} ms/step"
            )
        report: dict[str, Any] = {
            "machine": machine(),
            "background_cores": background_cores(),
            "masks": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.set_grad_enabled(False)
    engine = build_engine(
        EngineOptions(
            gguf_path(folder),
            device=args.device,
            kv_cache_tokens=32768,
            max_batch_size=64,  # room for all 50 validity requests at once
            tokenizer_dir=folder,
        )
    )
    report = {"machine": machine(), "background_cores": background_cores()}
    report["cost"] = (
        []
        if args.only_validity
        else [cost(engine, tokenizer, b, args.tokens, args.repeats) for b in args.batches]
    )
    for row in report["cost"]:
        print(
            f"batch {row['batch']:>2}: free {row['free_median_ms']:.1f} ms/step, guided "
            f"{row['guided_median_ms']:.1f} ms/step ({row['overhead_pct']:+.1f} %); repeats "
            f"free {[round(x, 1) for x in row['free_ms_per_step']]} guided "
            f"{[round(x, 1) for x in row['guided_ms_per_step']]}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")  # the costs, if validity is cut
    report["validity"] = validity(engine, tokenizer, args.max_new, 10 if args.quick else 50)
    engine.stop()
    valid = report["validity"]
    for mode in ("free", "guided"):
        row = valid[mode]
        print(
            f"{mode}: {row['valid']}/{valid['schemas']} valid, {row['cut_by_max_new']} cut by "
            f"max_new, valid of those finished {row['valid_of_finished']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
