"""Tool-call parsing: what clients see from a model's raw output, however the output is split
into streamed pieces."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from control_plane.canonical import Event, TextDelta, Tool, ToolCallDelta, ToolCallStart
from control_plane.tool_calls import (
    HermesParser,
    Llama3JsonParser,
    PlainParser,
    ToolParser,
    parser_for,
)


def run(parser: ToolParser, pieces: list[str]) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    events: list[Event] = []
    # Harmony's parser reads token ids, not text.
    assert isinstance(parser, HermesParser | Llama3JsonParser | PlainParser)
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.finish())
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: dict[int, list[str]] = {}
    ids = set()
    for event in events:
        if isinstance(event, ToolCallStart):
            assert event.index == len(calls), "calls are numbered in order"
            calls[event.index] = [event.name, ""]
            ids.add(event.id)
        elif isinstance(event, ToolCallDelta):
            calls[event.index][1] += event.arguments
    assert len(ids) == len(calls), "every call has its own id"
    return text, [(name, json.loads(arguments)) for name, arguments in calls.values()]


def splits(text: str) -> st.SearchStrategy[list[str]]:
    """Every way of cutting `text` into streamed pieces."""
    return st.lists(st.integers(0, len(text)), max_size=12).map(
        lambda cuts: [
            text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)], strict=True)
        ]
    )


HERMES = (
    "Let me look.\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "note": "a </tool_call> b"}}'
    "\n</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {}}\n</tool_call>\n'
)


@given(splits(HERMES))
def test_hermes_calls_whatever_the_streamed_pieces(pieces: list[str]) -> None:
    text, calls = run(HermesParser(), pieces)
    # The first `</tool_call>` closes the region, as in every Hermes parser: the JSON inside is
    # broken, so that region comes back as the text the model wrote, not as an empty call.
    assert calls == [("get_time", {})]
    assert text.startswith("Let me look.<tool_call>")
    assert "get_time" not in text


CLEAN = (
    'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "ü"}]}}\n</tool_call>\n'
    '<tool_call>{"name": "b", "arguments": "{\\"z\\": true}"}</tool_call>\n\n'
)


@given(splits(CLEAN))
def test_hermes_no_tag_or_whitespace_leaks(pieces: list[str]) -> None:
    text, calls = run(HermesParser(), pieces)
    assert text == "Sure."
    assert calls == [("a", {"x": [1, {"y": "ü"}]}), ("b", {"z": True})]


@given(splits("I would call <tool_ but no.\nTwo lines  "))
def test_hermes_plain_text_is_kept_exactly(pieces: list[str]) -> None:
    text, calls = run(HermesParser(), pieces)
    assert text == "I would call <tool_ but no.\nTwo lines  "
    assert calls == []


def test_hermes_unterminated_call_is_taken_when_it_parses() -> None:
    text, calls = run(HermesParser(), ['<tool_call>\n{"name": "a", "arguments": {"k": 1}}\n'])
    assert (text, calls) == ("", [("a", {"k": 1})])
    text, calls = run(HermesParser(), ['<tool_call>\n{"name": "a", "argum'])
    assert (text, calls) == ('<tool_call>\n{"name": "a", "argum', [])


def test_hermes_parallel_off_keeps_the_first_call_and_stops() -> None:
    parser = HermesParser(max_calls=1)
    events = parser.feed(CLEAN)
    assert parser.done
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["a"]
    assert parser.finish() == []


def test_arguments_arrive_as_fragments() -> None:
    long = json.dumps({"text": "x" * 100})
    events = HermesParser().feed(f'<tool_call>{{"name": "w", "arguments": {long}}}</tool_call>')
    fragments = [e.arguments for e in events if isinstance(e, ToolCallDelta)]
    assert len(fragments) > 3
    assert json.loads("".join(fragments)) == {"text": "x" * 100}


@given(
    splits(
        '<|python_tag|>{"name": "f", "parameters": {"q": "a;b"}}; {"name": "g", "parameters": {}}'
    )
)
def test_llama3_json_calls(pieces: list[str]) -> None:
    text, calls = run(Llama3JsonParser(), pieces)
    assert (text, calls) == ("", [("f", {"q": "a;b"}), ("g", {})])


@given(splits('{"answer": 42} is what a JSON answer looks like'))
def test_llama3_json_that_is_no_call_stays_text(pieces: list[str]) -> None:
    text, calls = run(Llama3JsonParser(), pieces)
    assert (text, calls) == ('{"answer": 42} is what a JSON answer looks like', [])


def test_llama3_text_answer_streams_as_text() -> None:
    parser = Llama3JsonParser()
    assert parser.feed("Hello") == [TextDelta("Hello")]
    assert parser.feed(" there") == [TextDelta(" there")]


def test_without_tools_tags_are_just_text() -> None:
    parser = parser_for("hermes", tools_offered=False)
    assert run(parser, [CLEAN]) == (CLEAN, [])


# ---- Qwen3-Coder's XML calls --------------------------------------------------------------------

FORECAST = Tool(
    "get_forecast",
    "The forecast for a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "threshold": {"type": "number"},
            "hourly": {"type": "boolean"},
            "fields": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object"},
            "zip": {"type": "string"},
            "units": {"anyOf": [{"type": "null"}, {"type": "string"}]},
        },
    },
)
# As Qwen3-Coder-30B-A3B-Instruct writes them (its chat template's instructions): a line break
# around every value, strings unquoted, JSON for arrays and objects.
QWEN3_CODER = (
    "I'll check the forecast.\n<tool_call>\n<function=get_forecast>\n"
    "<parameter=city>\nSão Paulo\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=threshold>\n-2.5\n</parameter>\n"
    "<parameter=hourly>\nTrue\n</parameter>\n"
    '<parameter=fields>\n["temp", "wind"]\n</parameter>\n'
    '<parameter=where>\n{"lat": -23.5, "lon": -46.6}\n</parameter>\n'
    "<parameter=zip>\n01310\n</parameter>\n"
    "<parameter=note>\nline one\n  line two\n</parameter>\n"
    "</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
)


@given(splits(QWEN3_CODER))
def test_qwen3_coder_calls_take_their_schema_types(pieces: list[str]) -> None:
    parser = parser_for("qwen3_coder", True, tools=(FORECAST,))
    text, calls = run(parser, pieces)
    assert text == "I'll check the forecast."
    assert calls == [
        (
            "get_forecast",
            {
                "city": "São Paulo",
                "days": 3,
                "threshold": -2.5,
                "hourly": True,
                "fields": ["temp", "wind"],
                "where": {"lat": -23.5, "lon": -46.6},
                "zip": "01310",  # a string by its schema, though it reads as a number
                "note": "line one\n  line two",  # undeclared: the text as written
            },
        ),
        ("get_time", {}),
    ]


def test_qwen3_coder_values_that_do_not_read_as_their_type_stay_text() -> None:
    parser = parser_for("qwen3_coder", True, tools=(FORECAST,))
    body = (
        "<tool_call>\n<function=get_forecast>\n<parameter=days>\nthree\n</parameter>\n"
        "<parameter=fields>\n[broken\n</parameter>\n<parameter=units>\nnull\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert run(parser, [body])[1] == [
        ("get_forecast", {"days": "three", "fields": "[broken", "units": None})
    ]


def test_qwen3_coder_region_without_a_function_is_given_back_as_text() -> None:
    parser = parser_for("qwen3_coder", True, tools=(FORECAST,))
    raw = "<tool_call>\nget_forecast(city='Oslo')\n</tool_call>"
    # (the space before a call region goes, as for Hermes calls, even when it is no call)
    assert run(parser, ["Sure. ", raw]) == ("Sure." + raw, [])


def test_qwen3_coder_unterminated_call_is_taken_at_the_end() -> None:
    parser = parser_for("qwen3_coder", True, tools=(FORECAST,))
    cut = "<tool_call>\n<function=get_forecast>\n<parameter=city>\nOslo\n</parameter>\n"
    assert run(parser, [cut]) == ("", [("get_forecast", {"city": "Oslo"})])


def test_qwen3_coder_parallel_off_keeps_the_first_call() -> None:
    parser = parser_for("qwen3_coder", True, parallel=False, tools=(FORECAST,))
    text, calls = run(parser, [QWEN3_CODER])
    assert text == "I'll check the forecast."
    assert [name for name, _ in calls] == ["get_forecast"]
    assert parser.done
