"""PNG plots of benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def gateway_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """Added time to first token and throughput ratio against concurrency; RSS over requests."""
    cells = report["cells"]
    concurrency = [row["concurrency"] for row in cells]
    labels = [k for k, v in cells[0].items() if isinstance(v, dict) and "throughput_ratio" in v]
    paths = []

    figure, (ttft, ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for number, label in enumerate(labels):
        color = f"C{number}"
        p50 = [r[label]["added_ttft_p50_ms"] for r in cells]
        p99 = [r[label]["added_ttft_p99_ms"] for r in cells]
        ttft.plot(concurrency, p50, "o-", color=color, label=f"{label} p50")
        ttft.plot(concurrency, p99, "x--", color=color, label=f"{label} p99")
        ratios = [r[label]["throughput_ratio"] for r in cells]
        ratio.plot(concurrency, ratios, "o-", color=color, label=label)
    ttft.axhline(1, color="green", linewidth=0.8, label="target p50 (1 ms)")
    ttft.axhline(5, color="orange", linewidth=0.8, label="target p99 (5 ms)")
    ttft.set(
        xscale="log",
        yscale="symlog",
        xlabel="concurrent streams",
        ylabel="ms, gateway − direct (log above 1)",
        title="Added time to first token",
    )
    ratio.axhline(0.9, color="green", linewidth=0.8, label="target (0.9)")
    ratio.set(
        xscale="log", xlabel="concurrent streams", ylabel="gateway ÷ direct", title="Throughput"
    )
    for axes in (ttft, ratio):
        axes.set_xticks(concurrency, [str(c) for c in concurrency])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left" if axes is ttft else "lower left")
    figure.suptitle(
        f"cortex gateway overhead — {report['machine']['cpu']}, {report['machine']['cores']} cores"
    )
    figure.tight_layout()
    paths.append(folder / "gateway_overhead.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    if report.get("memory"):
        figure, axes = plt.subplots(figsize=(5.5, 3.5))
        points = report["memory"]
        axes.plot([p["requests"] for p in points], [p["rss_mib"] for p in points], "o-")
        axes.set(xscale="log", xlabel="requests served", ylabel="RSS (MiB)", title="Gateway memory")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        paths.append(folder / "gateway_memory.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths
