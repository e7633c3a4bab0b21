"""A real Prometheus (Debian's `prometheus`) with the shipped configuration, its target lists
written by `cortex prometheus-targets`, scraping the real embedded stack: the gateway's cortex_*
token totals equal the usage the openai SDK received, and Triton's nv_* series are there,
labelled with the node."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Embedded, free_ports, stop, wait_for
from tests.observability.conftest import (
    NODE,
    REPO,
    cortex,
    program,
    triton_metrics_port,
    write_cortex_toml,
)

SHIPPED = REPO / "containers" / "prometheus" / "prometheus.yml"
MODEL = "cortex-tiny"
WAIT_S = 30.0


def derived_config(listen: str) -> dict[str, Any]:
    """The shipped configuration, scraping every second, its own job pointed at `listen`."""
    config = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [listen]
    return dict(config)


@pytest.fixture(scope="module")
def prometheus(
    embedded: Embedded, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    binary = program("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    listen = f"127.0.0.1:{free_ports(1)[0]}"
    (folder / "prometheus.yml").write_text(yaml.safe_dump(derived_config(listen)), encoding="utf-8")
    # The neurons' /metrics answer their token only (the shipped job reads it from this file).
    (folder / "secrets").mkdir()
    (folder / "secrets" / "neuron_token").write_text(embedded.neuron_token, encoding="utf-8")
    toml = write_cortex_toml(folder / "cortex.toml", embedded)
    written = cortex("prometheus-targets", "--config", str(toml), "--out", str(folder / "targets"))
    assert written.returncode == 0, written.stderr
    log = folder / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={listen}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://{listen}/-/ready", 30, process)
        with httpx.Client(base_url=f"http://{listen}/api/v1", timeout=5) as client:
            yield client
    except Exception:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop(process, signal.SIGTERM, timeout=20)


def query(prometheus: httpx.Client, promql: str) -> list[dict[str, Any]]:
    body = prometheus.get("/query", params={"query": promql}).json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def wait_for_value(prometheus: httpx.Client, promql: str, expected: float) -> None:
    deadline = time.monotonic() + WAIT_S
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = query(prometheus, promql)
        if seen and float(seen[0]["value"][1]) >= expected:
            break
        time.sleep(0.25)
    assert seen, f"no series for {promql} in {WAIT_S} s"
    assert float(seen[0]["value"][1]) == expected, (promql, seen)


def sample_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a series' samples as the exporter itself serves them now."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            # The parser names counter samples `<name>_total` even where the exporter (Triton)
            # writes them without the suffix.
            named = sample.name in (name, f"{name}_total")
            if named and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def test_both_jobs_are_scraped(prometheus: httpx.Client) -> None:
    shipped_jobs = {
        job["job_name"] for job in yaml.safe_load(SHIPPED.read_text())["scrape_configs"]
    }
    deadline = time.monotonic() + WAIT_S
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        targets = prometheus.get("/targets").json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if set(health.values()) == {"up"} and set(health) == shipped_jobs:
            break
        time.sleep(0.25)
    assert health == dict.fromkeys(shipped_jobs, "up")


def test_token_totals_equal_client_usage_and_triton_series_are_there(
    prometheus: httpx.Client, embedded: Embedded
) -> None:
    triton_metrics = f"http://127.0.0.1:{triton_metrics_port(embedded)}/metrics"
    # Earlier tests share this fleet: count from what the exporters hold now.
    before_input = sample_sum(embedded.metrics_url, "cortex_input_tokens_total", model=MODEL)
    before_output = sample_sum(embedded.metrics_url, "cortex_output_tokens_total", model=MODEL)
    before_success = sample_sum(triton_metrics, "nv_inference_request_success", model=MODEL)

    client = openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)
    usages = []
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five"}], max_tokens=12
    )
    usages.append(reply.usage)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is a dict?"}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages.extend(chunk.usage for chunk in stream if chunk.usage is not None)
    completion = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=7)
    usages.append(completion.usage)
    assert len(usages) == 3 and all(u is not None for u in usages)
    prompt_tokens = sum(u.prompt_tokens for u in usages if u is not None)
    completion_tokens = sum(u.completion_tokens for u in usages if u is not None)

    where = f'{{job="cortex-gateway", model="{MODEL}"}}'
    wait_for_value(
        prometheus, f"sum(cortex_input_tokens_total{where})", before_input + prompt_tokens
    )
    wait_for_value(
        prometheus, f"sum(cortex_output_tokens_total{where})", before_output + completion_tokens
    )
    requests = query(prometheus, f'cortex_requests_total{{model="{MODEL}", outcome="ok"}}')
    assert {r["metric"]["node"] for r in requests} == {NODE}
    assert "openai" in {r["metric"]["api"] for r in requests}

    # Triton's own series, with the node label the target list gives them.
    wait_for_value(
        prometheus,
        f'sum(nv_inference_request_success{{job="triton", node="{NODE}", model="{MODEL}"}})',
        before_success + 3,
    )
    assert query(prometheus, f'nv_inference_compute_infer_duration_us{{node="{NODE}"}}')
