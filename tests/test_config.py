"""Configuration errors are one clear line naming the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cortex.config import (
    ConfigError,
    EvictionStrategy,
    load_cortex_config,
    load_neuron_config,
)

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
