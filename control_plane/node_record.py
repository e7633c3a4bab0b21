"""What the gateway keeps per neuron, and its circuit breaker: plain data and pure decisions
(each takes `now`), beside `routing` and `lifecycle`. `Fleet` owns the records, does the I/O
(polls, loads) and asks these what follows from it.

A node is down after `missed_polls_down` missed polls in a row, or at once when a request
fails on it. The breaker counts the times it went down: `failures` within `window_s` keep it
out of rotation for `open_s`, even while it answers polls meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from control_plane.routing import NodeView
from cortex.neuron_api import CatalogueEntry, NeuronStatus

if TYPE_CHECKING:
    from control_plane.node_client import TritonStream


@dataclass
class CircuitBreaker:
    failures: int
    window_s: float
    open_s: float
    _downs: deque[float] = field(default_factory=deque)
    out_until: float = 0.0

    def went_down(self, now: float) -> bool:
        """Count one more time the node went down; True when that opens the breaker."""
        self._downs.append(now)
        while self._downs and self._downs[0] < now - self.window_s:
            self._downs.popleft()
        if len(self._downs) < self.failures:
            return False
        self.out_until = now + self.open_s
        self._downs.clear()
        return True

    def is_open(self, now: float) -> bool:
        """Whether the node stays out of rotation now, whatever its polls say."""
        return now < self.out_until


@dataclass
class NodeRecord:
    """One neuron as this gateway knows it: its last status, whether it is up, and what this
    gateway has under way there (requests, loads, unloads, models being moved off)."""

    client: Any  # a `fleet.NodeClient`
    breaker: CircuitBreaker
    status: NeuronStatus | None = None
    up: bool = False
    missed: int = 0
    triton: TritonStream | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    loading: dict[str, int] = field(default_factory=dict)
    leaving: set[str] = field(default_factory=set)
    # Models the tier gauge was last set for on this node (`Fleet._record_tiers`).
    tiered: set[str] = field(default_factory=set)
    catalogue: dict[str, CatalogueEntry] | None = None

    def missed_poll(self, down_after: int) -> bool:
        """Count a missed poll; True when the node is to be called down for it."""
        self.missed += 1
        return self.missed >= down_after

    def view(self, name: str) -> NodeView:
        """The record as the planners see it: a copy, so a plan never sees it change."""
        return NodeView(
            name,
            self.up,
            self.status,
            dict(self.in_flight),
            frozenset(self.draining),
            dict(self.loading),
            frozenset(self.leaving),
            self.catalogue,
        )
