"""Configuration errors are one clear line naming the file, the key and the problem."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.config import (
    ConfigError,
    CortexConfig,
    EvictionStrategy,
    GatewaySection,
    load_cortex_config,
    load_neuron_config,
)
from cortex.secrets import KeyDigests

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_files_are_valid(tmp_path: Path) -> None:
    config = load_cortex_config(REPO / "cortex.example.toml")
    assert config.eviction.strategy is EvictionStrategy.LRU
    assert [n.name for n in config.neurons] == ["gpu-a", "gpu-b"]
    neuron = load_neuron_config(REPO / "neuron.example.toml")
    assert {m.name for m in neuron.models.models} >= {"llama-3.1-8b-fp8"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[gateway]\nlisten = "127.0.0.1:1"\nlisen = "x"\n', ":3: gateway.lisen: unknown key"),
        ('[gateway]\nlisten = "nope"\n', ":2: gateway.listen: Value error, expected HOST:PORT"),
        (
            '[eviction]\nstrategy = "fifo"\n',
            ":2: eviction.strategy: Input should be 'lru', 'priority' or 'demand'",
        ),
        ("[eviction]\ndefrag_after_cycles = -1\n", ":2: eviction.defrag_after_cycles:"),
        (
            '[[neurons]]\nname = "a"\nendpoint = "http://h:1"\n\n[[neurons]]\nname = "b"\nendpoint = "ftp://x"\n',
            ":7: neurons.1.endpoint: Value error, expected an URL",
        ),
        ('[[neurons]]\nendpoint = "http://h:1"\n', ":1: neurons.0.name: required key is missing"),
        ("[gateway\n", "not valid TOML"),
    ],
)
def test_cortex_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "cortex.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_cortex_config(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_cortex_config(tmp_path / "absent.toml")


def test_models_file_errors_name_the_models_file(tmp_path: Path) -> None:
    write(tmp_path, "models.toml", '[[models]]\nname = "m"\nsource = "/x"\nengine = "onnx"\n')
    neuron = write(tmp_path, "neuron.toml", '[neuron]\nmodels = "models.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_neuron_config(neuron)
    assert str(caught.value).startswith(str(tmp_path / "models.toml") + ":4: models.0.engine:")


def test_duplicate_model_names(tmp_path: Path) -> None:
    write(
        tmp_path,
        "models.toml",
        '[[models]]\nname = "m"\nsource = "/x"\n[[models]]\nname = "m"\nsource = "/y"\n',
    )
    neuron = write(tmp_path, "neuron.toml", "")
    with pytest.raises(ConfigError, match="used twice"):
        load_neuron_config(neuron)


def test_cli_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "cortex.toml", "[gateway]\nport = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}:2: gateway.port: unknown key"]


# ---------------------------------------------------------------------------------------------
# Secrets and who may reach a node (issue 25)


@pytest.mark.parametrize(
    ("neuron", "expected"),
    [
        (
            '[neuron]\nlisten = "0.0.0.0:13131"\n',
            ":2: neuron.listen: 0.0.0.0 is reachable from the network but neuron.token is not set",
        ),
        (
            '[neuron]\nname = "a"\n\n[triton]\naddress = "10.0.0.5"\n',
            ":5: triton.address: 10.0.0.5 is reachable from the network but neuron.token",
        ),
        ('[neuron]\ntoken_env = "CORTEX_UNSET_VARIABLE"\n', ":2: neuron.token_env: Value error, "),
        (
            '[neuron]\ntoken = "a"\ntoken_env = "HOME"\n',
            "neuron: Value error, set only one of token, token_env and token_file",
        ),
        ('[neuron]\ntoken_file = "absent"\n', ":2: neuron.token_file: Value error, cannot read"),
        (
            '[triton]\ntls_cert = "/x.pem"\n',
            "triton: Value error, tls_cert and tls_key go together",
        ),
    ],
)
def test_neuron_exposure_and_secret_errors(tmp_path: Path, neuron: str, expected: str) -> None:
    write(tmp_path, "models.toml", "")
    path = write(tmp_path, "neuron.toml", neuron)
    with pytest.raises(ConfigError) as caught:
        load_neuron_config(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "neuron",
    [
        '[neuron]\nlisten = "0.0.0.0:13131"\ntoken = "t"\n\n[triton]\naddress = "0.0.0.0"\n',
        '[neuron]\nlisten = "0.0.0.0:13131"\ntoken_file = "token"\n',
        '[neuron]\nlisten = "0.0.0.0:1"\nallow_unauthenticated = true\n\n[triton]\naddress = "::"\n',
        '[neuron]\nlisten = "[::1]:13131"\n\n[triton]\naddress = "localhost"\n',
    ],
)
def test_neuron_beyond_loopback_with_a_token_or_consent(tmp_path: Path, neuron: str) -> None:
    write(tmp_path, "models.toml", "")
    write(tmp_path, "token", "from-a-file\n")
    config = load_neuron_config(write(tmp_path, "neuron.toml", neuron))
    if config.neuron.token_file:  # relative to neuron.toml, wherever the process runs
        assert config.neuron.bearer_token() == "from-a-file"


def test_api_keys_in_every_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_KEY_A", "sk-env")
    write(tmp_path, "keys", "# one a line\nsk-file-1\n\nsk-file-2\n")
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    path = write(
        tmp_path,
        "cortex.toml",
        f'[gateway]\napi_keys = ["sk-plain"]\napi_key_sha256 = ["{digest.upper()}"]\n'
        'api_keys_env = ["CORTEX_KEY_A"]\napi_keys_file = "keys"\n',
    )
    keys = KeyDigests(load_cortex_config(path).gateway.key_digests())
    for key in ("sk-plain", "sk-hashed", "sk-env", "sk-file-1", "sk-file-2"):
        assert keys.accepts(key), key
    for key in ("", "sk-plai", "sk-plain ", digest, "# one a line"):
        assert not keys.accepts(key), key


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        ('api_key_sha256 = ["abc"]', ":2: gateway.api_key_sha256: Value error, expected SHA-256"),
        ('api_keys_env = ["CORTEX_UNSET_VARIABLE"]', ":2: gateway.api_keys_env: Value error, "),
        ('api_keys_file = "absent"', ":2: gateway.api_keys_file: Value error, cannot read"),
    ],
)
def test_api_key_errors(tmp_path: Path, gateway: str, expected: str) -> None:
    path = write(tmp_path, "cortex.toml", f"[gateway]\n{gateway}\n")
    with pytest.raises(ConfigError) as caught:
        load_cortex_config(path)
    assert str(caught.value).startswith(str(path) + expected)
    assert "sk-" not in str(caught.value)


def test_gateway_beyond_loopback_without_keys_warns(caplog: pytest.LogCaptureFixture) -> None:
    from control_plane.app import create_app

    with caplog.at_level(logging.WARNING, logger="cortex.gateway"):
        create_app(CortexConfig(gateway=GatewaySection(listen="0.0.0.0:1")), name="open")
        create_app(CortexConfig(gateway=GatewaySection(listen="127.0.0.1:1")), name="loopback")
        create_app(
            CortexConfig(gateway=GatewaySection(listen="0.0.0.0:1", api_keys=("k",))), name="keyed"
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "0.0.0.0:1 with no API keys" in warnings[0]
