"""The benchmark scripts run as documented, end to end, from this checkout: a real neuron, a real
tritonserver, real gateways, the load generator. Nothing here judges the numbers (timings on a
shared CI machine prove nothing); it holds that the commands in BENCHMARKS.md keep working and
that every request they send is answered."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(
    r"^added_ttft_p50_ms=(-?[\d.]+) added_ttft_p99_ms=(-?[\d.]+) throughput_ratio=([\d.]+)$"
)


def run_benchmark(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_gateway_overhead_quick_mode(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    lines = run_benchmark("benchmarks.gateway_overhead", "--quick", "--out", str(out))
    assert LAST_LINE.match(lines[-1]), lines[-1]
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["concurrency"] == 64
    for path in ("direct", "openai"):
        assert cell[path]["errors"] == 0, cell[path]
        assert cell[path]["requests"] == 64 * 4 * 3  # streams × requests per stream × rounds
        assert cell[path]["tokens_mean"] == 32  # every token of every answer arrived
    assert cell["openai"]["gateway_cpu_ms_per_request"] > 0


def test_cold_load_quick_mode(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    lines = run_benchmark("benchmarks.cold_load", "--quick", "--out", str(out))
    assert lines[-1] == f"results: {out}"
    (repetition,) = json.loads(out.read_text())["repetitions"]
    assert repetition["triton_load_s"] > 0
    assert repetition["one_request_first_token_s"] > 0
    assert len(repetition["ten_requests_first_token_s"]) == 10


def test_triton_rss_quick_run(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rss.json"
    args = ("--client", "gateway", "--model", "fake", "--requests", "200", "--every", "100")
    lines = run_benchmark("benchmarks.triton_rss", *args, "--concurrency", "16", "--out", str(out))
    result = json.loads(out.read_text())
    # The leak it found shows only over a thousand requests or more (BENCHMARKS.md): this run
    # holds that the command works, not the numbers.
    assert [s["requests"] for s in result["samples"]] == [0, 100, 200], lines
    assert all(s["rss_bytes"] > 0 for s in result["samples"])
