"""Every failure in the dialect's own envelope and status, seen through the official SDKs (and
raw HTTP where the exact bytes matter), against the replay fleet, which has an API key set."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway.conftest import CONTEXT_LENGTH, ReplayFleet

# Sent through both SDKs, whose message types differ: plain JSON.
USER: list[Any] = [{"role": "user", "content": "hello"}]


# ---- authentication -----------------------------------------------------------------------------


def test_wrong_key_is_401_in_openai_envelope(replay_fleet: ReplayFleet) -> None:
    client = openai.OpenAI(base_url=replay_fleet.openai_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="replay-hermes", messages=USER)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_wrong_key_is_401_in_anthropic_envelope(replay_fleet: ReplayFleet) -> None:
    client = anthropic.Anthropic(base_url=replay_fleet.root_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model="replay-hermes", max_tokens=5, messages=USER)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert caught.value.body["request_id"].startswith("req_")
    with pytest.raises(anthropic.AuthenticationError):  # the model list, by its header
        client.models.list()


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "KEY"},
        {"authorization": "Bearer KEY"},
        {"x-api-key": "stale", "authorization": "Bearer KEY"},  # Claude Code may send both
    ],
)
def test_both_key_headers_are_accepted(replay_fleet: ReplayFleet, headers: dict[str, str]) -> None:
    headers = {k: v.replace("KEY", replay_fleet.api_key) for k, v in headers.items()}
    for version in ("2023-06-01", "2026-10-21"):
        response = httpx.post(
            f"{replay_fleet.root_url}/v1/messages/count_tokens?beta=true",
            json={"model": "replay-hermes", "messages": USER},
            headers={**headers, "anthropic-version": version},
            timeout=60,  # the first count builds the tokenizer (httpx's default is 5 s)
        )
        assert response.status_code == 200, response.text
        assert response.json()["input_tokens"] > 0


def test_missing_key_and_probes(replay_fleet: ReplayFleet) -> None:
    response = httpx.post(
        f"{replay_fleet.root_url}/v1/messages", json={}, headers={"anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 401
    assert response.json()["error"] == {
        "type": "authentication_error",
        "message": "invalid or missing API key",
    }
    # The warm-up probes answer without a key; they reveal nothing.
    assert httpx.head(f"{replay_fleet.root_url}/api/hello").status_code == 200


# ---- invalid requests ---------------------------------------------------------------------------


def test_invalid_request_names_the_field_openai(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="replay-hermes",
            # A role no SDK type allows: the point of the test.
            messages=[{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}],  # type: ignore[misc, list-item]
        )
    assert caught.value.param == "messages[1].role"
    assert caught.value.type == "invalid_request_error"


def test_invalid_request_names_the_field_anthropic(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model="replay-hermes",
            max_tokens=5,
            messages=[{"role": "user", "content": [{"type": "text"}]}],  # type: ignore[misc, list-item]
        )
    assert isinstance(caught.value.body, dict)
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "messages.0.content.0.text: Field required"
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model="replay-hermes",
            max_tokens=5,
            messages=USER,
            tool_choice={"type": "tool", "name": "missing"},
            tools=[{"name": "present", "input_schema": {"type": "object"}}],
        )
    assert isinstance(caught.value.body, dict)
    assert "tool_choice names 'missing'" in caught.value.body["error"]["message"]


def test_unknown_model_is_404_in_both_envelopes(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    with pytest.raises(openai.NotFoundError) as openai_caught:
        oai.chat.completions.create(model="nope", messages=USER)
    assert openai_caught.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as anthropic_caught:
        claude.messages.create(model="nope", max_tokens=5, messages=USER)
    assert isinstance(anthropic_caught.value.body, dict)
    assert anthropic_caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="nope", messages=USER)


# ---- prompt too long ----------------------------------------------------------------------------


def long_prompt() -> list[Any]:
    return [{"role": "user", "content": "word " * (CONTEXT_LENGTH + 100)}]


def test_prompt_too_long_in_openai_wording(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="replay-hermes", messages=long_prompt())
    assert caught.value.code == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT_LENGTH} tokens" in caught.value.message


def test_prompt_too_long_in_anthropic_wording(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model="replay-hermes", messages=long_prompt()
    ).input_tokens
    assert counted > CONTEXT_LENGTH  # still counted, so a client can decide to compact
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="replay-hermes", max_tokens=5, messages=long_prompt())
    assert isinstance(caught.value.body, dict)
    message = caught.value.body["error"]["message"]
    assert message == f"prompt is too long: {counted} tokens > {CONTEXT_LENGTH} maximum"


# ---- overloaded, timeouts -----------------------------------------------------------------------


def test_overloaded_with_retry_after(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    crowded: list[Any] = [{"role": "user", "content": "it is crowded"}]
    with pytest.raises(openai.InternalServerError) as openai_caught:
        oai.chat.completions.create(model="replay-hermes", messages=crowded)
    assert openai_caught.value.status_code == 503
    assert openai_caught.value.code == "overloaded"
    assert int(openai_caught.value.response.headers["retry-after"]) > 0
    with pytest.raises(anthropic.APIStatusError) as anthropic_caught:
        claude.messages.create(model="replay-hermes", max_tokens=5, messages=crowded)
    assert anthropic_caught.value.status_code == 529
    assert isinstance(anthropic_caught.value.body, dict)
    assert anthropic_caught.value.body["error"]["type"] == "overloaded_error"
    assert int(anthropic_caught.value.response.headers["retry-after"]) > 0


def test_generation_past_the_request_timeout(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    slow: list[Any] = [{"role": "user", "content": "never finish"}]
    with pytest.raises(openai.APIStatusError) as openai_caught:
        oai.chat.completions.create(model="replay-hermes", messages=slow)
    assert openai_caught.value.status_code == 504
    assert openai_caught.value.code == "timeout"
    with pytest.raises(anthropic.APIStatusError) as anthropic_caught:
        claude.messages.create(model="replay-hermes", max_tokens=5, messages=slow)
    assert anthropic_caught.value.status_code == 504
    assert isinstance(anthropic_caught.value.body, dict)
    assert anthropic_caught.value.body["error"]["type"] == "timeout_error"


def test_unknown_route_is_404(replay_fleet: ReplayFleet) -> None:
    response = httpx.get(
        f"{replay_fleet.root_url}/v1/nothing-here",
        headers={"authorization": f"Bearer {replay_fleet.api_key}"},
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
