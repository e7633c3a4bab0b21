"""Pure routing over a fleet snapshot: which node serves a request, where a cold model goes.

No I/O here: `fleet.py` builds the snapshot from the neurons' /status and acts on the answers.

A snapshot's derived views (each node's catalogue, the replicas of each model, free memory per
device) are computed once per snapshot and cached, so a decision over a fleet of a thousand nodes
costs a dictionary lookup per node rather than a rebuild of every catalogue
(benchmarks/planner_scale.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from control_plane.canonical import ChatRequest
from cortex.neuron_api import CatalogueEntry, LoadedModel, ModelState, NeuronStatus


@dataclass(frozen=True)
class NodeView:
    name: str
    up: bool
    status: NeuronStatus | None
    # Requests this gateway has in flight on the node, per model.
    in_flight: dict[str, int] = field(default_factory=dict)
    # Models being moved off this node: READY, but new requests go elsewhere.
    draining: frozenset[str] = frozenset()
    # Loads this gateway has under way here that the neuron may not report yet: model → bytes.
    # Placement counts them as taken, so two plans made at once never pick the same memory.
    loading: dict[str, int] = field(default_factory=dict)
    # Models this gateway is unloading here: their memory is not free yet, and no second plan
    # may count on evicting them.
    leaving: frozenset[str] = frozenset()
    # The catalogue by model name when the caller keeps one per status (it changes only with
    # the status); otherwise built from the status on first use.
    catalogue_index: dict[str, CatalogueEntry] | None = field(default=None, repr=False)
    # Planner results that depend only on this view (residents, victim orders), kept with it.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def loaded(self) -> dict[str, LoadedModel]:
        """What the neuron reports loaded (any state), by name."""
        if self.status is None:
            return {}
        return {m.name: m for m in self.status.loaded}

    @cached_property
    def _ready(self) -> frozenset[str]:
        if not self.up or self.status is None:
            return frozenset()
        # Models on their way out (moved off, or being evicted) take no new requests.
        ready = frozenset(m.name for m in self.status.loaded if m.state == ModelState.READY)
        return ready - self.draining - self.leaving

    def ready_models(self) -> frozenset[str]:
        return self._ready

    @cached_property
    def _catalogue(self) -> dict[str, CatalogueEntry]:
        if not self.up or self.status is None:
            return {}
        if self.catalogue_index is not None:
            return self.catalogue_index
        return catalogue_index(self.status)

    def catalogue(self) -> dict[str, CatalogueEntry]:
        return self._catalogue

    @cached_property
    def device_free(self) -> dict[int, int]:
        """Free bytes per device, less what this gateway's loads under way will take. A load's
        bytes are taken from the devices with the most room, as the neuron places them."""
        if self.status is None:
            return {}
        free = {g.index: g.memory_free_bytes for g in self.status.gpus}
        for model, size in self.loading.items():
            if model in self.loaded or not free:  # the neuron counts it already
                continue
            entry = self._catalogue.get(model)
            tp = entry.profile.tp if entry else 1
            for index in sorted(free, key=lambda i: -free[i])[:tp]:
                free[index] -= size // tp
        return free

    @cached_property
    def _free_total(self) -> int:
        return sum(self.device_free.values())

    def free_bytes(self) -> int:
        return self._free_total

    @cached_property
    def free_descending(self) -> tuple[int, ...]:
        """Free bytes per device, largest first: a model of tp N fits if the N-th is enough."""
        return tuple(sorted(self.device_free.values(), reverse=True))

    def fits(self, need_per_device: int, tp: int) -> bool:
        frees = self.free_descending
        return len(frees) >= tp and frees[tp - 1] >= need_per_device


def catalogue_index(status: NeuronStatus) -> dict[str, CatalogueEntry]:
    return {entry.profile.name: entry for entry in status.catalogue}


def busy(node: NodeView, model: str) -> int:
    """Requests in flight for `model` on `node`: the one definition routing and lifecycle share.

    The engine's count (as of the last poll) already includes this gateway's requests, so adding
    the two would count them twice; the gateway's own count is the fresher one. The larger of
    the two is exact with one gateway and a lower bound with several (a gateway sees the others'
    requests only through the engine)."""
    reported = node.loaded.get(model)
    return max(node.in_flight.get(model, 0), reported.in_flight if reported else 0)


@dataclass(frozen=True)
class FleetSnapshot:
    nodes: tuple[NodeView, ...]
    # The merged catalogue when the caller keeps one (it changes only when a node's does);
    # otherwise it is merged from the nodes on first use.
    merged: dict[str, CatalogueEntry] | None = None

    @cached_property
    def _catalogue(self) -> dict[str, CatalogueEntry]:
        if self.merged is not None:
            return self.merged
        return merge_catalogues(self.nodes)

    def catalogue(self) -> dict[str, CatalogueEntry]:
        """Every model any up node can serve (first node's profile wins for shared names)."""
        return self._catalogue

    @cached_property
    def _index(self) -> tuple[dict[str, list[NodeView]], dict[str, list[str]]]:
        ready: dict[str, list[NodeView]] = {}
        placed: dict[str, list[str]] = {}
        for node in self.nodes:
            for model in node.ready_models():
                ready.setdefault(model, []).append(node)
            if node.up:
                for model in {*node.loaded, *node.loading} - node.leaving:
                    placed.setdefault(model, []).append(node.name)
        return ready, placed

    def replicas(self, model: str) -> list[NodeView]:
        """The up nodes with `model` READY (and not draining), in fleet order. One query scans
        the nodes; bulk callers build the index once (`replica_index`)."""
        if "_index" in self.__dict__:
            return self._index[0].get(model, [])
        return [n for n in self.nodes if model in n.ready_models()]

    def replica_index(self) -> dict[str, list[NodeView]]:
        return self._index[0]

    def loaded_on(self, model: str) -> list[str]:
        return [n.name for n in self.replicas(model)]

    def placed_on(self, model: str) -> list[str]:
        """Up nodes that hold the model in any state (READY, LOADING, …) or are loading it."""
        return self._index[1].get(model, [])


def merge_catalogues(nodes: tuple[NodeView, ...]) -> dict[str, CatalogueEntry]:
    merged: dict[str, CatalogueEntry] = {}
    for node in nodes:
        for name, entry in node.catalogue().items():
            merged.setdefault(name, entry)
    return merged


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


def conversation_key(request: ChatRequest) -> str | None:
    """What identifies a conversation across its turns: the system text and the messages up to
    and including the first user message. Every later turn of the same conversation starts with
    exactly these, while two conversations that share only a system prompt (as every Claude Code
    session does) differ in them. None for a request without a user message."""
    digest = hashlib.blake2b(digest_size=16)
    if request.raw_prompt is not None:
        digest.update(request.raw_prompt[:4096].encode("utf-8", "surrogatepass"))
        return digest.hexdigest()
    for message in request.messages:
        digest.update(message.role.encode() + b"\0")
        digest.update(message.content.encode("utf-8", "surrogatepass") + b"\0")
        if message.role == "user":
            return digest.hexdigest()
    return None


def _affinity(key: str, node: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{node}".encode(), digest_size=8).digest()


def choose_replica(
    snapshot: FleetSnapshot, model: str, affinity: str | None = None, slack: int = 4
) -> str | None:
    """The node to serve a request for a model READY somewhere, or None.

    Without an affinity key: the least busy replica. With one (a conversation's key), the replica
    the key hashes to — rendezvous hashing, so a conversation's turns land where its prefix is
    cached and a replica coming or going moves only its own share — unless that replica has more
    than `slack` requests in flight beyond the least busy one; then the least busy."""
    ready = snapshot.replicas(model)
    if not ready:
        return None
    if len(ready) == 1:
        return ready[0].name
    least = min(ready, key=lambda n: (busy(n, model), n.name))
    if affinity is None:
        return least.name
    preferred = max(ready, key=lambda n: _affinity(affinity, n.name))
    if busy(preferred, model) - busy(least, model) > slack:
        return least.name
    return preferred.name
