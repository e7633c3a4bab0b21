"""README's metric table lists exactly what control_plane/metrics.py exports."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from control_plane.metrics import GatewayMetrics
from tests.observability.conftest import REPO


def exported() -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """name as scraped (counters with _total) → (type, labels)."""
    metrics = [m for m in vars(GatewayMetrics()).values() if isinstance(m, MetricWrapperBase)]
    return {
        m._name + ("_total" if m._type == "counter" else ""): (m._type, tuple(m._labelnames))
        for m in metrics
    }


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `cortex_"):
            labels = tuple(label.strip() for label in cells[2].split(","))
            table[cells[0].strip("`")] = (cells[1], labels)
    return table


def test_readme_metric_table_matches_the_code() -> None:
    assert documented() == exported()
    assert all(name.startswith("cortex_") for name in exported())
