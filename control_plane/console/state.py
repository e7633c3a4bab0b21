"""What the console shows, as plain data: nodes, models, keys and recent errors.

`fleet_view` is a pure function of a fleet snapshot and the gateway's own metric samples;
`RecentErrors` keeps the last warnings and failed requests the gateway logged (a logging
handler, so nothing that logs has to know about the console).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry

from control_plane.routing import FleetSnapshot, busy
from cortex.neuron_api import ModelState, RequestOutcome

# A copy's residency tier as the console names it (the `tier` label of cortex_model_tier); a
# copy loading or unloading is in neither.
TIERS = {ModelState.READY: "loaded", ModelState.ASLEEP: "asleep"}
# Outcomes of a request that are not errors worth showing.
_QUIET_OUTCOMES = frozenset({RequestOutcome.OK, RequestOutcome.CANCELLED})


def model_samples(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Per model, from the gateway's own metrics since it started: requests, output tokens,
    and the sums and counts of time to first token and of decode speed."""
    found: dict[str, dict[str, float]] = {}
    wanted = {
        "cortex_requests_total": "requests",
        "cortex_output_tokens_total": "output_tokens",
        "cortex_time_to_first_token_seconds_sum": "ttft_sum",
        "cortex_time_to_first_token_seconds_count": "ttft_count",
        "cortex_output_tokens_per_second_sum": "tps_sum",
        "cortex_output_tokens_per_second_count": "tps_count",
    }
    for family in registry.collect():
        for sample in family.samples:
            key = wanted.get(sample.name)
            model = sample.labels.get("model")
            if key is None or model is None:
                continue
            totals = found.setdefault(model, dict.fromkeys(wanted.values(), 0.0))
            totals[key] += sample.value
    return found


def fleet_view(
    snapshot: FleetSnapshot, samples: dict[str, dict[str, float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nodes, models) for the console: every node with its devices, every catalogued model
    with where it is and what the gateway has measured of it."""
    nodes: list[dict[str, Any]] = []
    for node in snapshot.nodes:
        status = node.status
        nodes.append(
            {
                "name": node.name,
                "up": node.up,
                "triton": status.triton.state if status else None,
                "gpus": [
                    {
                        "index": gpu.index,
                        "name": gpu.name,
                        "virtual": gpu.virtual,
                        "memory_total_bytes": gpu.memory_total_bytes,
                        "memory_used_bytes": gpu.memory_used_bytes,
                        "memory_free_bytes": gpu.memory_free_bytes,
                    }
                    for gpu in (status.gpus if status else [])
                ],
                "events": list(status.events[-5:]) if status else [],
            }
        )
    models: list[dict[str, Any]] = []
    catalogue: dict[str, Any] = {}
    for node in snapshot.nodes:
        if node.status is not None:
            for entry in node.status.catalogue:
                catalogue.setdefault(entry.profile.name, entry)
    for name, entry in sorted(catalogue.items()):
        placements = []
        last_used: float | None = None
        for node in snapshot.nodes:
            loaded = node.loaded.get(name)
            if loaded is None:
                continue
            placements.append(
                {
                    "node": node.name,
                    "state": loaded.state,
                    "tier": TIERS.get(loaded.state),
                    "gpus": loaded.gpus,
                    "memory_bytes": loaded.memory_bytes,
                    "in_flight": busy(node, name),
                }
            )
            if loaded.last_used is not None:
                last_used = max(last_used or 0.0, loaded.last_used)
        measured = samples.get(name, {})
        ttft_count = measured.get("ttft_count", 0.0)
        tps_count = measured.get("tps_count", 0.0)
        models.append(
            {
                "name": name,
                "engine": entry.profile.engine.value,
                "aliases": list(entry.profile.aliases),
                "pinned": entry.profile.pinned,
                "can_sleep": entry.can_sleep,
                "estimated_bytes": entry.estimated_bytes,
                "context_length": entry.context_length,
                "placements": placements,
                "in_flight": sum(p["in_flight"] for p in placements),
                "last_used": last_used,
                "requests": measured.get("requests", 0.0),
                "output_tokens": measured.get("output_tokens", 0.0),
                "mean_ttft_s": measured["ttft_sum"] / ttft_count if ttft_count else None,
                "mean_tokens_per_s": measured["tps_sum"] / tps_count if tps_count else None,
            }
        )
    return nodes, models


class RecentErrors(logging.Handler):
    """The last `size` warnings and failed requests the gateway logged, newest last."""

    def __init__(self, size: int = 50) -> None:
        # No level: requests are logged at INFO, and `filter` picks the failed ones.
        super().__init__(logging.NOTSET)
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)

    def filter(self, record: logging.LogRecord) -> bool:
        outcome = getattr(record, "outcome", None)
        if outcome is not None:  # the one line per request: errors only
            return outcome not in _QUIET_OUTCOMES
        return record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(
            {
                "time": record.created,
                "level": record.levelname.lower(),
                "message": record.getMessage()[:500],
                "model": getattr(record, "model", None),
                "outcome": getattr(record, "outcome", None),
            }
        )

    def recent(self, since: float | None = None) -> list[dict[str, Any]]:
        horizon = since if since is not None else time.time() - 3600
        return [entry for entry in self.entries if entry["time"] >= horizon]


def visible_usage(
    usage: dict[str, dict[str, object]], name: str, admin: bool
) -> dict[str, dict[str, object]]:
    """An admin sees every key's usage; another key sees its own."""
    return dict(usage) if admin else {k: v for k, v in usage.items() if k == name}
