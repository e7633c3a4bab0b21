"""Sleep and wake in the torch engine (issue 28), in-process on CPU: a sleeping engine holds no
KV cache and takes no request, refuses to sleep with a request in flight, and after waking
answers token for token as before; the control socket the neuron uses does the same."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuron_agent.torch_engine import residency
from neuron_agent.torch_engine.errors import RequestRejected
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest
from tests.torch_engine.test_engine import Collector

PROMPT = [1, 17, 230, 41, 9, 88, 301, 5, 77, 12, 40, 3, 19, 250, 8, 66, 90, 2, 33]


def generate(engine: Engine, tokens: int = 12) -> list[int]:
    collector = Collector()
    engine.submit(GenerationRequest(list(PROMPT), tokens, collector.emit, collector.fail))
    assert collector.done.wait(60), "no answer"
    assert collector.error is None, collector.error
    return collector.tokens


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    built = build_engine(EngineOptions(tiny_model, kv_cache_tokens=2048, max_batch_size=4))
    built.start()
    yield built
    built.stop()


def test_sleep_releases_the_cache_and_wake_answers_as_before(engine: Engine) -> None:
    before = generate(engine)
    cache_bytes = engine.pool.nbytes()
    assert cache_bytes > 0 and engine.pool.cached_blocks > 0  # the prompt's prefix is cached
    slept = residency.sleep(engine)
    assert slept["released_bytes"] == cache_bytes
    assert engine.pool.nbytes() == 0 and engine.pool.cached_blocks == 0
    with pytest.raises(RequestRejected, match="asleep"):
        generate(engine)
    woken = residency.wake(engine)
    assert woken["restored_bytes"] == cache_bytes
    assert generate(engine) == before  # greedy, recomputed from scratch: the same tokens


def test_no_sleep_with_a_request_in_flight(engine: Engine) -> None:
    collector = Collector()
    engine.submit(GenerationRequest(list(PROMPT), 400, collector.emit, collector.fail))
    with pytest.raises(RequestRejected, match="in flight"):
        residency.sleep(engine)
    assert not engine.asleep
    assert collector.done.wait(120) and collector.error is None
    assert engine.pool.nbytes() > 0


def control(path: Path, operation: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(60)
        client.connect(str(path))
        client.sendall(json.dumps({"op": operation}).encode() + b"\n")
        return dict(json.loads(client.makefile("rb").readline()))


def test_the_control_socket(engine: Engine, tmp_path: Path) -> None:
    path = residency.control_socket(tmp_path / "stats" / "m.json")
    assert len(str(path)) < 108  # a Unix socket's limit, whatever the state folder's length
    server = residency.ControlServer(path, engine)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        before = generate(engine)
        assert control(path, "sleep")["asleep"] is True
        assert control(path, "state") == {"ok": True, "asleep": True}
        assert control(path, "wake")["asleep"] is False
        assert generate(engine) == before
        assert control(path, "reboot") == {
            "ok": False,
            "error": "expected one of ['sleep', 'state', 'wake']",
        }
    finally:
        server.close()
    assert not path.exists()
