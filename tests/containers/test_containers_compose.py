"""The Compose files and the example configs they mount agree with each other and validate."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cortex.config import load_cortex_config, load_neuron_config, split_host_port

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
# compose file → the example configs it mounts.
COMPOSE_FILES = {
    "compose.yaml": CONTAINERS / "config" / "gpu",
    "compose.cpu.yaml": CONTAINERS / "config" / "cpu",
}
NEURONS = ("neuron-a", "neuron-b")


def load_compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((CONTAINERS / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → host path (relative to containers/) of the service's ./ bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = source
    return mounts


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_validates(name: str, compose_command: list[str]) -> None:
    result = subprocess.run(
        [*compose_command, "-f", str(CONTAINERS / name), "config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # docker-compose 1.x drops unknown keys that arrive through a YAML merge (<<: *anchor)
    # instead of rejecting them: every key written must survive into the resolved file.
    resolved = yaml.safe_load(result.stdout)["services"]
    for service_name, service in load_compose(name)["services"].items():
        dropped = set(service) - set(resolved[service_name])
        assert not dropped, f"{name}: {service_name}: unknown keys {sorted(dropped)}"


def test_compose_validation_rejects_an_unknown_key(
    compose_command: list[str], tmp_path: Path
) -> None:
    # Guards the test above against a validator that accepts everything.
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  a:\n    image: x\n    shm_sise: 1gb\n", encoding="utf-8")
    result = subprocess.run(
        [*compose_command, "-f", str(broken), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "shm_sise" in result.stderr


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_refers_to_files_that_exist(name: str) -> None:
    mounts = builds = 0
    for service_name, service in load_compose(name)["services"].items():
        for source in bind_mounts(service).values():
            assert (CONTAINERS / source).exists(), f"{name}: {service_name} mounts {source}"
            mounts += 1
        build = service.get("build")
        if build:
            assert (CONTAINERS / build["context"] / build["dockerfile"]).is_file()
            builds += 1
    # Checked inside loops only, a file with neither would pass: each compose file mounts its
    # configs and builds its images.
    assert mounts and builds, f"{name}: {mounts} bind mounts and {builds} builds checked"


@pytest.mark.parametrize(("name", "config_dir"), COMPOSE_FILES.items())
def test_example_configs_load_and_match_the_services(name: str, config_dir: Path) -> None:
    services = load_compose(name)["services"]
    gateway = load_cortex_config(config_dir / "cortex.toml")
    # Inside a container a loopback listener cannot be reached from outside it.
    assert split_host_port(gateway.gateway.listen)[0] == "0.0.0.0"
    assert split_host_port(gateway.gateway.metrics_listen)[0] == "0.0.0.0"
    assert [neuron.name for neuron in gateway.neurons] == list(NEURONS)
    assert bind_mounts(services["gateway"])["/etc/cortex/cortex.toml"] == (
        f"./{(config_dir / 'cortex.toml').relative_to(CONTAINERS)}"
    )
    for reference in gateway.neurons:
        mounts = bind_mounts(services[reference.name])
        neuron_toml = CONTAINERS / mounts["/etc/cortex/neuron.toml"]
        # neuron.toml names models.toml relative to itself: both sit in /etc/cortex.
        assert (CONTAINERS / mounts["/etc/cortex/models.toml"]).parent == neuron_toml.parent
        node = load_neuron_config(neuron_toml)
        assert node.neuron.name == reference.name
        assert node.neuron.token == reference.token
        host, port = split_host_port(node.neuron.listen)
        assert host == "0.0.0.0"
        assert reference.endpoint == f"http://{reference.name}:{port}"
        assert node.models.models, f"{neuron_toml.name} serves no model"
        assert node.neuron.state_dir.startswith("/var/lib/cortex/")


def test_gpu_neurons_reserve_a_gpu_each() -> None:
    services = load_compose("compose.yaml")["services"]
    reserved = []
    for name in NEURONS:
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        reserved += device["device_ids"]
    assert len(set(reserved)) == len(reserved) == len(NEURONS)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_prometheus_targets_name_the_compose_services(name: str) -> None:
    config_dir = COMPOSE_FILES[name]
    services = load_compose(name)["services"]
    assert bind_mounts(services["prometheus"])["/etc/prometheus"] == "./prometheus"
    targets = CONTAINERS / "prometheus" / "targets"
    gateway = load_cortex_config(config_dir / "cortex.toml")
    gateway_targets = json.loads((targets / "gateway.json").read_text(encoding="utf-8"))
    metrics_port = split_host_port(gateway.gateway.metrics_listen)[1]
    assert [group["targets"] for group in gateway_targets] == [[f"gateway:{metrics_port}"]]
    triton_targets = json.loads((targets / "triton.json").read_text(encoding="utf-8"))
    prometheus = yaml.safe_load((CONTAINERS / "prometheus" / "prometheus.yml").read_text())
    triton_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "triton")
    credentials = CONTAINERS / "prometheus" / triton_job["authorization"]["credentials_file"]
    shipped_token = credentials.read_text(encoding="utf-8").strip()
    expected = []
    for neuron in NEURONS:
        node = load_neuron_config(
            CONTAINERS / bind_mounts(services[neuron])["/etc/cortex/neuron.toml"]
        )
        # The neuron's own port: its /metrics re-exports Triton's, which binds loopback.
        port = split_host_port(node.neuron.listen)[1]
        expected.append(([f"{neuron}:{port}"], {"node": node.neuron.name}))
        # Prometheus scrapes it with the neuron's token, from the file the job names.
        assert shipped_token == node.neuron.bearer_token()
    assert [(group["targets"], group["labels"]) for group in triton_targets] == expected
