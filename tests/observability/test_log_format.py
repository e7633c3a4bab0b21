"""The JSON log format: one object per line, `extra=` fields and the current request's id."""

from __future__ import annotations

import json
import logging

from cortex import logs


def record(**extra: object) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "cortex.requests",
            "levelno": 20,
            "levelname": "INFO",
            "msg": "request %s",
            "args": ("x",),
            **extra,
        }
    )


def test_extra_fields_become_json_fields() -> None:
    line = logs.JsonFormatter().format(record(request_id="r-1", prompt_tokens=12, ttft_s=None))
    entry = json.loads(line)
    assert entry["message"] == "request x" and entry["logger"] == "cortex.requests"
    assert entry["level"] == "info"
    assert entry["request_id"] == "r-1" and entry["prompt_tokens"] == 12
    assert entry["ttft_s"] is None
    assert "args" not in entry and "msg" not in entry and "\n" not in line


def test_lines_logged_while_serving_a_request_carry_its_id() -> None:
    stamp = logs.RequestIdFilter()
    plain = record()
    assert stamp.filter(plain) and not hasattr(plain, "request_id")
    token = logs.request_id.set("r-2")
    try:
        stamped, own = record(), record(request_id="mine")
        stamp.filter(stamped)
        stamp.filter(own)
    finally:
        logs.request_id.reset(token)
    assert json.loads(logs.JsonFormatter().format(stamped))["request_id"] == "r-2"
    assert vars(own)["request_id"] == "mine"
