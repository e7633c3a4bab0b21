"""Pure routing over a fleet snapshot: which node serves a request, where a cold model goes.

No I/O here: `fleet.py` builds the snapshot from the neurons' /status and acts on the answers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from cortex.neuron_api import CatalogueEntry, NeuronStatus


@dataclass(frozen=True)
class NodeView:
    name: str
    up: bool
    status: NeuronStatus | None
    # Requests this gateway has in flight on the node, per model.
    in_flight: dict[str, int] = field(default_factory=dict)
    # Models being moved off this node: READY, but new requests go elsewhere.
    draining: frozenset[str] = frozenset()

    def ready_models(self) -> set[str]:
        if not self.up or self.status is None:
            return set()
        return {m.name for m in self.status.loaded if m.state == "READY"} - self.draining

    def catalogue(self) -> dict[str, CatalogueEntry]:
        if not self.up or self.status is None:
            return {}
        return {entry.profile.name: entry for entry in self.status.catalogue}

    def free_bytes(self) -> int:
        if self.status is None:
            return 0
        return sum(g.memory_free_bytes for g in self.status.gpus)


@dataclass(frozen=True)
class FleetSnapshot:
    nodes: tuple[NodeView, ...]

    def catalogue(self) -> dict[str, CatalogueEntry]:
        """Every model any up node can serve (first node's profile wins for shared names)."""
        merged: dict[str, CatalogueEntry] = {}
        for node in self.nodes:
            for name, entry in node.catalogue().items():
                merged.setdefault(name, entry)
        return merged

    def loaded_on(self, model: str) -> list[str]:
        return [n.name for n in self.nodes if model in n.ready_models()]


def resolve_model(snapshot: FleetSnapshot, requested: str) -> str | None:
    """A model name or alias (shell patterns such as `claude-*` allowed) → the model's name."""
    catalogue = snapshot.catalogue()
    if requested in catalogue:
        return requested
    for name, entry in catalogue.items():
        if requested in entry.profile.aliases:
            return name
    for name, entry in catalogue.items():
        if any(fnmatch.fnmatchcase(requested, alias) for alias in entry.profile.aliases):
            return name
    return None


def choose_replica(snapshot: FleetSnapshot, model: str) -> str | None:
    """The least busy up node that has the model READY."""
    ready = [n for n in snapshot.nodes if model in n.ready_models()]
    if not ready:
        return None

    def load(node: NodeView) -> tuple[int, str]:
        assert node.status is not None
        engine_in_flight = sum(m.in_flight for m in node.status.loaded if m.name == model)
        return (max(node.in_flight.get(model, 0), engine_in_flight), node.name)

    return min(ready, key=load).name
