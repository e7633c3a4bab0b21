"""Keys as records: `[[keys]]` validation (file:line:key errors), and on the replay fleet (a real
neuron, Triton and gateway; tests/gateway/conftest.py) through the official SDKs: limits answered
with 429 in each dialect's envelope with Retry-After and never passed to a node, model patterns,
the priority class reaching the engine, and usage per key name in Prometheus and the console's
state (never the key)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from control_plane.keys import Caller, KeyRing
from cortex.config import ConfigError, CortexConfig, GatewaySection, KeyRecord, load_cortex_config
from tests.gateway.conftest import API_KEY, KEYS, ReplayFleet


def oai_for(fleet: ReplayFleet, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.openai_url, api_key=key, max_retries=0)


def claude_for(fleet: ReplayFleet, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.root_url, api_key=key, max_retries=0)


def key_of(name: str) -> str:
    return str(KEYS[name]["key"])


def metric(fleet: ReplayFleet, name: str, **labels: str) -> float:
    """A sample's value from the gateway's /metrics (0 when the series does not exist)."""
    text = httpx.get(fleet.metrics_url).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def ask(client: openai.OpenAI, text: str, model: str = "replay-hermes", **extra: Any) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **extra
    )
    return reply.choices[0].message.content or ""


# ---- config -------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[keys]]\nname = "a"\nkey = "sk-1"\n\n[[keys]]\nname = "b"\nkey = "sk-2"\nrpm = 0\n',
            ":8: keys.1.rpm: Input should be greater than 0",
        ),
        (
            '[[keys]]\nname = "a"\nkey = "sk-1"\nkey_sha256 = "' + "0" * 64 + '"\n',
            ":1: keys.0: Value error, set exactly one of key, key_sha256, key_file and key_env",
        ),
        ('[[keys]]\nname = "a"\n', ":1: keys.0: Value error, set exactly one of key"),
        (
            '[[keys]]\nname = "a"\nkey = "sk-1"\npriority = "urgent"\n',
            ":4: keys.0.priority: Input should be 'interactive' or 'batch'",
        ),
        ('[[keys]]\nname = "a"\nkey_sha256 = "abc"\n', ":3: keys.0.key_sha256: Value error"),
        ('[[keys]]\nname = "a"\nkey = "sk-1"\nlimit = 3\n', ":4: keys.0.limit: unknown key"),
        (
            '[[keys]]\nname = "a"\nkey = "sk-1"\n[[keys]]\nname = "a"\nkey = "sk-2"\n',
            "keys: Value error, key name 'a' is used twice",
        ),
        (
            '[gateway]\napi_keys = ["sk-1"]\n[[keys]]\nname = "a"\nkey = "sk-1"\n',
            "keys: Value error, key 'a' is also listed in [gateway] api_keys",
        ),
        ('[[keys]]\nname = "unnamed"\nkey = "sk-1"\n', ":2: keys.0.name: Value error"),
        ('[[keys]]\nname = "a"\nkey = "sk-1"\nmodels = []\n', ":4: keys.0.models: Value error"),
    ],
)
def test_key_record_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_cortex_config(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)
    assert "sk-1" not in str(caught.value) and "sk-2" not in str(caught.value)


def test_every_spelling_of_a_record_identifies_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "team.key").write_text("sk-from-file\n")
    monkeypatch.setenv("TEAM_KEY", "sk-from-env")
    digest = hashlib.sha256(b"sk-from-digest").hexdigest()
    path = write(
        tmp_path,
        '[gateway]\napi_keys = ["sk-plain"]\n'
        '[[keys]]\nname = "literal"\nkey = "sk-literal"\nadmin = true\n'
        '[[keys]]\nname = "file"\nkey_file = "team.key"\nmodels = ["qwen-*"]\n'
        f'[[keys]]\nname = "env"\nkey_env = "TEAM_KEY"\npriority = "batch"\n'
        f'[[keys]]\nname = "digest"\nkey_sha256 = "{digest.upper()}"\nrpm = 5\n',
    )
    ring = KeyRing(load_cortex_config(path))
    names = {
        offered: (found.name if (found := ring.identify([offered])) else None)
        for offered in (
            "sk-plain",
            "sk-literal",
            "sk-from-file",
            "sk-from-env",
            "sk-from-digest",
            "sk-wrong",
        )
    }
    assert names == {
        "sk-plain": "unnamed",
        "sk-literal": "literal",
        "sk-from-file": "file",
        "sk-from-env": "env",
        "sk-from-digest": "digest",
        "sk-wrong": None,
    }
    # A wrong key beside a right one (Claude Code may send two) still identifies the caller.
    found = ring.identify(["sk-wrong", "sk-from-env"])
    assert found is not None and found.priority == "batch"


def test_model_patterns_match_the_name_asked_or_the_catalogue_name() -> None:
    caller = Caller("team", models=("qwen-*", "claude-*"))
    assert caller.may_use("qwen-7b", "qwen-7b")
    assert caller.may_use("claude-sonnet", "llama-8b")  # an alias the key may use
    assert not caller.may_use("llama-8b", "llama-8b")


def test_a_config_without_keys_is_open() -> None:
    assert not KeyRing(CortexConfig(gateway=GatewaySection()))
    assert KeyRing(CortexConfig(keys=(KeyRecord(name="a", key="sk-a"),)))


# ---- on the replay fleet ------------------------------------------------------------------


def test_rpm_is_answered_429_in_both_dialects_and_never_reaches_a_node(
    replay_fleet: ReplayFleet,
) -> None:
    name = "two-a-minute"
    client = oai_for(replay_fleet, key_of(name))
    assert ask(client, "hello")
    assert ask(client, "hello")
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "hello")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "rate_limit_exceeded" and body["type"] == "requests"
    assert "rpm" in body["message"]
    retry_after = int(caught.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60

    with pytest.raises(anthropic.RateLimitError) as refused:
        claude_for(replay_fleet, key_of(name)).messages.create(
            model="replay-hermes", max_tokens=16, messages=[{"role": "user", "content": "hello"}]
        )
    assert refused.value.status_code == 429
    error = refused.value.body
    assert isinstance(error, dict) and error["error"]["type"] == "rate_limit_error"
    assert int(refused.value.response.headers["retry-after"]) >= 1

    assert metric(replay_fleet, "cortex_key_requests_total", key=name) == 2
    assert metric(replay_fleet, "cortex_key_rate_limited_total", key=name, limit="requests") == 2


def test_tpm_refuses_once_the_minute_holds_the_tokens(replay_fleet: ReplayFleet) -> None:
    client = oai_for(replay_fleet, key_of("few-tokens"))
    words = " ".join(["word"] * 100)
    # About 110 prompt tokens, and as many again echoed back: under 300 now, over it after.
    assert ask(client, f"echo the prompt {words}", max_tokens=200)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, f"echo the prompt {words}", max_tokens=200)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "tokens" and "tpm" in body["message"]
    with pytest.raises(openai.RateLimitError) as too_large:
        ask(client, " ".join(["word"] * 400))
    assert "too large" in str(too_large.value)
    assert "retry-after" not in too_large.value.response.headers
    assert metric(replay_fleet, "cortex_key_requests_total", key="few-tokens") == 1


def test_max_concurrent_refuses_a_second_request_while_the_first_runs(
    replay_fleet: ReplayFleet,
) -> None:
    client = oai_for(replay_fleet, key_of("one-at-a-time"))
    answers: list[str] = []
    first = threading.Thread(target=lambda: answers.append(ask(client, "take your time")))
    first.start()
    deadline = time.monotonic() + 10
    while (
        metric(replay_fleet, "cortex_requests_in_flight", model="replay-hermes", node="replay-node")
        < 1
    ):
        assert time.monotonic() < deadline, "the first request never started"
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "hello")
    assert "max_concurrent 1" in str(caught.value)
    first.join(10)
    assert answers == ["Ready now."]
    assert ask(client, "hello")  # the slot is free again


def test_a_model_outside_the_keys_patterns_is_refused_in_each_dialect(
    replay_fleet: ReplayFleet,
) -> None:
    viewer = key_of("viewer")
    assert ask(oai_for(replay_fleet, viewer), "hello", model="replay-llama3")
    # Model lists show a key what it may use, in both dialects.
    assert [m.id for m in oai_for(replay_fleet, viewer).models.list()] == ["replay-llama3"]
    listed = claude_for(replay_fleet, viewer).models.list()
    assert [m.id for m in listed.data] == ["replay-llama3"]
    everything = {m.id for m in claude_for(replay_fleet, API_KEY).models.list().data}
    assert {"replay-hermes", "replay-llama3", "claude-replay"} <= everything
    with pytest.raises(openai.NotFoundError):
        oai_for(replay_fleet, viewer).models.retrieve("replay-hermes")
    for model in ("replay-hermes", "claude-replay"):  # by name, and by an alias of it
        with pytest.raises(openai.NotFoundError) as caught:
            ask(oai_for(replay_fleet, viewer), "hello", model=model)
        body = caught.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found"
        assert f"`{model}`" in body["message"] and body["param"] == "model"
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude_for(replay_fleet, viewer).messages.create(
            model="replay-hermes", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    error = denied.value.body
    assert isinstance(error, dict) and error["error"]["type"] == "permission_error"
    assert "replay-hermes" in error["error"]["message"]


def test_the_priority_class_reaches_the_engine(replay_fleet: ReplayFleet) -> None:
    plain = oai_for(replay_fleet, API_KEY)
    background = oai_for(replay_fleet, key_of("background"))
    assert ask(plain, "which priority") == "served as interactive"
    assert ask(background, "which priority") == "served as batch"
    lower = {"x-cortex-priority": "batch"}
    assert ask(plain, "which priority", extra_headers=lower) == "served as batch"
    # A request may lower its key's class, never raise it.
    higher = {"x-cortex-priority": "interactive"}
    assert ask(background, "which priority", extra_headers=higher) == "served as batch"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(plain, "which priority", extra_headers={"x-cortex-priority": "urgent"})
    assert "x-cortex-priority" in str(caught.value)


def test_usage_is_counted_per_key_name_and_no_key_reaches_the_metrics(
    replay_fleet: ReplayFleet,
) -> None:
    admin = key_of("admin")
    before = metric(replay_fleet, "cortex_key_output_tokens_total", key="admin")
    reply = oai_for(replay_fleet, admin).chat.completions.create(
        model="replay-hermes", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.usage is not None
    assert metric(replay_fleet, "cortex_key_output_tokens_total", key="admin") == (
        before + reply.usage.completion_tokens
    )
    assert metric(replay_fleet, "cortex_key_input_tokens_total", key="admin") >= (
        reply.usage.prompt_tokens
    )
    text = httpx.get(replay_fleet.metrics_url).text
    for record in KEYS.values():
        assert str(record["key"]) not in text
    assert API_KEY not in text
    state = httpx.get(
        f"{replay_fleet.root_url}/ui/api/state", headers={"authorization": f"Bearer {admin}"}
    ).json()
    assert state["you"] == {"name": "admin", "admin": True, "priority": "interactive"}
    assert state["keys"]["admin"]["output_tokens"] >= reply.usage.completion_tokens
    assert state["keys"]["two-a-minute"]["limits"]["rpm"] == 2
