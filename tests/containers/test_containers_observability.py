"""Prometheus configuration and the Grafana dashboard: valid, and about the metrics cortex has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
PROMETHEUS = CONTAINERS / "prometheus"
GRAFANA = CONTAINERS / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cortex-fleet.json"
Tool = Callable[[str], str]

# What issue 7 asks the dashboard to show, by the series it reads.
REQUIRED_SERIES = {
    "cortex_time_to_first_token_seconds_bucket",
    "cortex_output_tokens_per_second_bucket",
    "cortex_requests_total",
    "cortex_node_memory_used_bytes",
    "cortex_node_memory_free_bytes",
    "cortex_model_loads_total",
    "cortex_model_load_seconds_sum",
    "cortex_evictions_total",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
}
# Grafana's variables, replaced by what they expand to so promtool can parse the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "3h",
    "$model": ".*",
    "$node": ".*",
}


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]


def test_prometheus_config_passes_promtool(tool: Tool, tmp_path: Path) -> None:
    # promtool also reads every file_sd target file the globs match.
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_reports_a_broken_target_file(tool: Tool, tmp_path: Path) -> None:
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, copy)
    (copy / "targets" / "triton-broken.json").write_text("[{", encoding="utf-8")
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(copy / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


def test_prometheus_scrapes_the_gateway_and_triton_from_target_files() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job_name, glob in (
        ("cortex-gateway", "targets/gateway*.json"),
        ("triton", "targets/triton*.json"),
    ):
        (file_sd,) = jobs[job_name]["file_sd_configs"]
        assert file_sd["files"] == [glob]
        assert list(PROMETHEUS.glob(glob)), f"no example target file for {glob}"
    for target_file in (PROMETHEUS / "targets").glob("*.json"):
        for group in json.loads(target_file.read_text(encoding="utf-8")):
            for target in group["targets"]:
                assert re.fullmatch(r"[A-Za-z0-9.\-]+:\d+", target), f"{target_file.name}: {target}"


def test_dashboard_queries_parse_as_promql(tool: Tool, tmp_path: Path) -> None:
    expressions = queries(dashboard())
    assert expressions
    rules = []
    for number, expression in enumerate(expressions):
        for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            expression = expression.replace(variable, GRAFANA_VARIABLES[variable])
        assert "$" not in expression, f"unknown Grafana variable in {expression}"
        rules.append({"record": f"dashboard_query_{number}", "expr": expression})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_the_fleet_metrics() -> None:
    text = " ".join(queries(dashboard()))
    used = set(re.findall(r"\b(?:cortex|nv)_[a-z0-9_]+", text))
    assert used >= REQUIRED_SERIES, f"missing {sorted(REQUIRED_SERIES - used)}"
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.95," in text


def test_dashboard_is_provisioned_with_its_datasource() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    (datasource,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    )["datasources"]
    uids = {
        source["uid"]
        for panel in panels(board)
        for source in [
            panel.get("datasource"),
            *[t.get("datasource") for t in panel.get("targets", [])],
        ]
        if source
    } | {variable["datasource"]["uid"] for variable in board["templating"]["list"]}
    assert uids == {datasource["uid"]}
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "cortex.yaml").read_text(encoding="utf-8")
    )["providers"]
    for compose_file in ("compose.yaml", "compose.cpu.yaml"):
        grafana = yaml.safe_load((CONTAINERS / compose_file).read_text(encoding="utf-8"))[
            "services"
        ]["grafana"]
        assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
        home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
