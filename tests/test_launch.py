"""cortex.launch: config files written from the models load back equal with cortex.config's own
loaders (every field away from its default, so each is written and read); the shell scripts'
command line; and the process handling: a process that dies while starting is reported with its
log, one that ignores SIGTERM is killed, and children left behind are killed and reported."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from cortex.config import (
    CortexConfig,
    EngineKind,
    EvictionSection,
    EvictionStrategy,
    GatewaySection,
    KVCacheDtype,
    ModelProfile,
    ModelsFile,
    NeuronConfig,
    NeuronRef,
    NeuronSection,
    Quantization,
    ReasoningFormat,
    ScalingSection,
    Speculation,
    ToolCallFormat,
    TritonSection,
    load_cortex_config,
    load_models_file,
    load_neuron_config,
)
from cortex.launch import (
    LaunchError,
    loopback_gateway,
    main,
    running_gateway,
    stop,
    write_gateway_config,
    write_models_file,
    write_neuron_config,
)

GATEWAY = CortexConfig(
    gateway=GatewaySection(
        listen="127.0.0.1:4100",
        metrics_listen="0.0.0.0:4101",
        api_keys=("sk-one", 'sk-"quoted"'),
        api_key_sha256=("ab" * 32,),
        poll_interval_s=0.25,
        missed_polls_down=5,
        load_timeout_s=12.5,
        request_timeout_s=30,
        ping_interval_s=0.5,
        drain_timeout_s=0,
        log_format="json",
        affinity_slack=0,
        breaker_failures=7,
        breaker_window_s=9.0,
        breaker_open_s=11.0,
    ),
    eviction=EvictionSection(
        strategy=EvictionStrategy.DEMAND,
        interval_s=3600,
        defrag_after_cycles=0,
        demand_half_life_s=20,
        drain_timeout_s=5,
        min_resident_s=4.0,
        max_swap_wait_s=12.5,
    ),
    scaling=ScalingSection(in_flight_per_replica=1.5, window_s=2, idle_s=3),
    neurons=(
        NeuronRef(name="a", endpoint="http://10.0.0.5:13131"),
        NeuronRef(
            name="b", endpoint="https://node-b:443", token="tok en", tls_ca="/etc/cortex/ca.pem"
        ),
    ),
)

MODELS = (
    ModelProfile(
        name="everything",
        aliases=("claude-*", "gpt-4o"),
        source="/models/with space/ckpt",
        engine=EngineKind.LLAMACPP,
        embedding=True,
        quantization=Quantization.INT4_AWQ,
        dtype="bfloat16",
        tp=2,
        priority=-3,
        pinned=True,
        min_replicas=2,
        max_replicas=3,
        idle_ttl_s=90.5,
        sleep_after_s=30.0,
        host_kv_cache_gib=0.5,
        speculation=Speculation.NGRAM,
        speculative_tokens=6,
        speculative_max_batch=2,
        neurons=("a", "b"),
        context_length=4096,
        tool_call_format=ToolCallFormat.LLAMA3_JSON,
        reasoning=ReasoningFormat.THINK,
        max_batch_size=64,
        kv_cache_tokens=16,
        max_queue_size=0,
        prefill_tokens=1024,
        cuda_graphs=False,
        prefix_caching=False,
        kv_cache_dtype=KVCacheDtype.FP8,
        batch_invariant=True,
        tokenizer="/models/tokenizer",
        template="/templates/fake",
    ),
    ModelProfile(name="plain", source="relative/ckpt"),
)


def neuron(folder: Path, models_file: str = "node-models.toml") -> NeuronConfig:
    return NeuronConfig(
        neuron=NeuronSection(
            name="gpu0",
            listen="127.0.0.1:14000",
            token="secret",
            allow_unauthenticated=True,
            models=models_file,
            state_dir=str(folder / "state"),
            memory_budget_mib=(800, 1400),
            host_memory_budget_mib=65536,
        ),
        triton=TritonSection(
            binary="/opt/tritonserver/bin/tritonserver",
            address="0.0.0.0",
            http_port=9000,
            grpc_port=9001,
            metrics_port=9002,
            startup_timeout_s=5,
            tls_cert="/etc/cortex/triton.pem",
            tls_key="/etc/cortex/triton.key",
            extra_args=("--log-verbose=1", "--exit-on-error=false"),
        ),
        models=ModelsFile(models=MODELS),
    )


def test_every_setting_differs_from_its_default() -> None:
    """The round trips below cover every field only if each one is set away from its default
    (but the other spellings of a secret, which exclude the one set: the round trip after)."""
    spellings = {"token_env", "token_file", "api_keys_env", "api_keys_file"}
    for model, section in [
        (GATEWAY.gateway, GatewaySection()),
        (GATEWAY.eviction, EvictionSection()),
        (GATEWAY.scaling, ScalingSection()),
        (MODELS[0], ModelProfile(name="x", source="y")),
        (neuron(Path("/x")).neuron, NeuronSection()),
        (neuron(Path("/x")).triton, TritonSection()),
    ]:
        fields = [f for f in type(model).model_fields if f not in spellings]
        same = [f for f in fields if getattr(model, f) == getattr(section, f)]
        assert same in ([], ["name"], ["source"], ["name", "source"]), (type(model), same)


def test_secret_spellings_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_TEST_KEY", "sk-from-env")
    (tmp_path / "keys").write_text("# client keys\nsk-from-file\n")
    (tmp_path / "token").write_text("tok-from-file\n")
    config = CortexConfig(
        gateway=GatewaySection(
            api_keys_env=("CORTEX_TEST_KEY",), api_keys_file=str(tmp_path / "keys")
        ),
        neurons=(
            NeuronRef(name="a", endpoint="http://a:1", token_env="CORTEX_TEST_KEY"),
            NeuronRef(name="b", endpoint="http://b:1", token_file=str(tmp_path / "token")),
        ),
    )
    path = write_gateway_config(tmp_path / "cortex.toml", config)
    loaded = load_cortex_config(path)
    assert loaded == config
    assert [ref.bearer_token() for ref in loaded.neurons] == ["sk-from-env", "tok-from-file"]
    assert "sk-from" not in path.read_text()  # the file names where secrets are, not them


def test_cortex_toml_round_trip(tmp_path: Path) -> None:
    path = write_gateway_config(tmp_path / "cortex.toml", GATEWAY, header="line one\nline two")
    assert load_cortex_config(path) == GATEWAY
    assert path.read_text().startswith("# line one\n# line two\n")


def test_defaults_are_left_out(tmp_path: Path) -> None:
    config = CortexConfig(gateway=GatewaySection(poll_interval_s=1.0))
    path = write_gateway_config(tmp_path / "cortex.toml", config)
    assert tomllib.loads(path.read_text()) == {"gateway": {"poll_interval_s": 1.0}}
    assert load_cortex_config(path) == config


def test_neuron_toml_round_trip_with_its_models_file(tmp_path: Path) -> None:
    config = neuron(tmp_path)
    path = write_neuron_config(tmp_path / "conf" / "neuron.toml", config)
    loaded = load_neuron_config(path)
    assert loaded == config.model_copy(update={"base_dir": str(path.parent.resolve())})
    assert load_models_file(tmp_path / "conf" / "node-models.toml").models == MODELS


def test_a_models_file_elsewhere_is_written_where_neuron_toml_points(tmp_path: Path) -> None:
    elsewhere = tmp_path / "shared" / "fleet-models.toml"
    config = neuron(tmp_path, models_file=str(elsewhere))
    path = write_neuron_config(tmp_path / "node" / "neuron.toml", config)
    assert list((tmp_path / "node").iterdir()) == [path]
    assert load_neuron_config(path).models.models == MODELS


def test_an_empty_models_file_loads(tmp_path: Path) -> None:
    path = write_models_file(tmp_path / "models.toml", ModelsFile())
    assert load_models_file(path) == ModelsFile()


def test_the_scripts_command_line_writes_what_the_loaders_read(tmp_path: Path) -> None:
    """As benchmarks/gpu/*.sh call it (`python -m cortex.launch`): dotted settings, one quoted
    string per model."""
    written = subprocess.run(
        [
            sys.executable,
            "-m",
            "cortex.launch",
            "neuron-config",
            str(tmp_path / "node"),
            "--set",
            "neuron.name=h200",
            "--set",
            "neuron.listen=127.0.0.1:13141",
            "--set",
            f"neuron.state_dir={tmp_path / 'node' / 'state'}",
            "--set",
            "neuron.memory_budget_mib=[4096]",
            "--set",
            "triton.address=127.0.0.1",
            "--model",
            "name=llama8b source='/tmp/a ckpt' dtype=bfloat16 kv_cache_tokens=131072",
            "--model",
            "name=nocache source=/tmp/ckpt prefix_caching=false aliases='[\"x-*\"]' idle_ttl_s=2.5",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert written.returncode == 0, written.stderr
    node = load_neuron_config(tmp_path / "node" / "neuron.toml")
    assert node.neuron == NeuronSection(
        name="h200",
        listen="127.0.0.1:13141",
        state_dir=str(tmp_path / "node" / "state"),
        memory_budget_mib=(4096,),
    )
    assert node.triton == TritonSection(address="127.0.0.1")
    assert node.models.models == (
        ModelProfile(
            name="llama8b", source="/tmp/a ckpt", dtype="bfloat16", kv_cache_tokens=131072
        ),
        ModelProfile(
            name="nocache",
            source="/tmp/ckpt",
            prefix_caching=False,
            aliases=("x-*",),
            idle_ttl_s=2.5,
        ),
    )
    main(
        [
            "gateway-config",
            str(tmp_path / "cortex.toml"),
            "--set",
            "gateway.listen=127.0.0.1:31323",
            "--set",
            "eviction.strategy=demand",
            "--neuron",
            "h200=http://127.0.0.1:13141",
        ]
    )
    assert load_cortex_config(tmp_path / "cortex.toml") == CortexConfig(
        gateway=GatewaySection(listen="127.0.0.1:31323"),
        eviction=EvictionSection(strategy=EvictionStrategy.DEMAND),
        neurons=(NeuronRef(name="h200", endpoint="http://127.0.0.1:13141"),),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["neuron-config", "X", "--model", "name=m"], "models.models.0.source: required key is"),
        (["neuron-config", "X", "--set", "neuron.listen=nowhere"], "neuron.listen: Value error"),
        (["neuron-config", "X", "--set", "neuron.nam=a"], "neuron.nam: unknown key"),
        (["neuron-config", "X", "--set", "oops"], "expected KEY=VALUE, got 'oops'"),
        (["gateway-config", "X", "--neuron", "a=ftp://x"], "neurons.0.endpoint: Value error"),
    ],
)
def test_the_command_line_names_a_bad_setting(
    args: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "out") if a == "X" else a for a in args])
    assert message in str(refused.value.code)
    assert not (tmp_path / "out").exists()


def test_a_gateway_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = loopback_gateway({})
        port = taken.getsockname()[1]
        config = config.model_copy(
            update={"gateway": config.gateway.model_copy(update={"listen": f"127.0.0.1:{port}"})}
        )
        started = time.monotonic()
        with (
            pytest.raises(LaunchError) as caught,
            running_gateway(tmp_path / "cortex.toml", config, timeout=60),
        ):
            pass
    assert time.monotonic() - started < 50  # noticed when it exited, not at the timeout
    assert caught.value.summary.startswith("the gateway exited with code")
    assert str(tmp_path / "cortex.log") in str(caught.value)
    assert "address already in use" in str(caught.value).lower()  # the log's tail


def gone(process: psutil.Process) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


SLEEPS = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"


def test_stop_kills_what_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", f"import signal; signal.signal(15, signal.SIG_IGN); {SLEEPS}"]
    )
    time.sleep(1.0)
    (child,) = psutil.Process(stubborn.pid).children()
    stop(stubborn, timeout=1)
    assert stubborn.returncode == -9
    assert gone(child)  # killed too, without an error: its parent was killed


def test_stop_reports_and_kills_children_left_running() -> None:
    leaky = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import signal, sys; signal.signal(15, lambda *_: sys.exit(0)); {SLEEPS}",
        ]
    )
    time.sleep(1.0)
    (child,) = psutil.Process(leaky.pid).children()
    with pytest.raises(LaunchError, match=r"left running: sleep \(\d+\)"):
        stop(leaky, timeout=1)
    assert leaky.returncode == 0
    assert gone(child)
