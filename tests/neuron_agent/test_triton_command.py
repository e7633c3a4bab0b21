"""The tritonserver command line the neuron runs: who may reach which port (issue 25). The
real binary's behaviour under these flags is tested in test_triton_lockdown.py; this checks
the flags for settings that test cannot bind (a network address)."""

from __future__ import annotations

from pathlib import Path

from cortex.config import TritonSection
from cortex.secrets import TRITON_KEY_HEADER, TRITON_RESTRICTED
from neuron_agent.triton import TritonLayout, TritonSupervisor

LAYOUT = TritonLayout(Path("/opt/tritonserver/bin/tritonserver"), Path("/backends"), [])


def flags(settings: TritonSection, restrict_grpc: bool = True) -> dict[str, list[str]]:
    supervisor = TritonSupervisor(
        settings, Path("/r"), Path("/s"), "p", "the-key", restrict_grpc=restrict_grpc
    )
    found: dict[str, list[str]] = {}
    for argument in supervisor.command(LAYOUT)[1:]:
        name, _, value = argument.partition("=")
        found.setdefault(name, []).append(value)
    return found


def test_only_grpc_follows_the_configured_address() -> None:
    found = flags(TritonSection(address="0.0.0.0"))
    assert found["--grpc-address"] == ["0.0.0.0"]
    assert found["--http-address"] == ["127.0.0.1"]
    assert found["--metrics-address"] == ["127.0.0.1"]


def test_every_protocol_but_health_needs_the_key_on_http_and_grpc() -> None:
    found = flags(TritonSection(address="0.0.0.0"))
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        [value] = found[flag]
        protocols, _, key = value.partition(":")
        assert set(protocols.split(",")) == {
            "metadata",
            "inference",
            "shared-memory",
            "model-config",
            "model-repository",
            "statistics",
            "trace",
            "logging",
        }
        assert key == f"{TRITON_KEY_HEADER}=the-key"
    assert "health" not in TRITON_RESTRICTED


def test_a_tokenless_node_keeps_http_keyed_and_grpc_open() -> None:
    found = flags(TritonSection(), restrict_grpc=False)
    assert "--grpc-restricted-protocol" not in found
    assert found["--http-restricted-api"][0].endswith(f"{TRITON_KEY_HEADER}=the-key")


def test_tls_flags_only_with_a_certificate() -> None:
    assert "--grpc-use-ssl" not in flags(TritonSection())
    found = flags(TritonSection(tls_cert="/c.pem", tls_key="/k.pem"))
    assert found["--grpc-use-ssl"] == ["true"]
    assert found["--grpc-server-cert"] == ["/c.pem"]
    assert found["--grpc-server-key"] == ["/k.pem"]
