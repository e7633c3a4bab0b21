"""Swap-aware queueing as pure decisions (issues 28 and 33): in what order the requests that
wait for a load, a wake or a switch go, and which waiting model may take a node first.

A request for a model that is READY nowhere waits (`Fleet.ensure_ready`); its model's waiters
form one queue, and the models with waiters form the swap queue. The rules:
  - a model whose oldest request has waited `max_swap_wait_s` or longer is overdue: overdue
    models go first, oldest first, whatever their class (the bound holds for batch keys too);
    an overdue model makes the models in its way yield — they finish what is in flight, and new
    requests for them queue behind the switch (`plan_placement(..., yielding=True)`);
  - before that, models with requests in flight (and those woken less than `min_resident_s`
    ago) stay: the resident model's requests are served before the next switch;
  - among models not overdue, those with an interactive request waiting go before batch ones,
    then the one waiting longest;
  - once a model is READY its waiters go together (a switch serves the whole batch), released
    interactive first, then in arrival order.
The order only decides switches: a model that fits somewhere without evicting anything is
placed at once, whatever its rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from control_plane.lifecycle import Resident, resident_for
from control_plane.routing import FleetSnapshot
from cortex.config import KeyPriority

_RANK = {KeyPriority.INTERACTIVE: 0, KeyPriority.BATCH: 1}


@dataclass(frozen=True)
class Waiter:
    """One request waiting for its model: its key's class, and when it began to wait."""

    model: str
    priority: KeyPriority
    since: float  # monotonic seconds
    sequence: int  # arrival order: ties on `since` keep it


@dataclass(frozen=True)
class WaitingModel:
    model: str
    oldest: float  # when its longest-waiting request began to wait
    interactive: bool  # whether an interactive request is among its waiters
    requests: int


def release_order(waiters: Iterable[Waiter]) -> list[Waiter]:
    """The order a model's waiters go once it is READY: interactive first, then by arrival."""
    return sorted(waiters, key=lambda w: (_RANK[w.priority], w.since, w.sequence))


def waiting_models(waiters: Iterable[Waiter]) -> dict[str, WaitingModel]:
    """The swap queue's members, by model."""
    grouped: dict[str, list[Waiter]] = {}
    for waiter in waiters:
        grouped.setdefault(waiter.model, []).append(waiter)
    return {
        model: WaitingModel(
            model,
            min(w.since for w in group),
            any(w.priority is KeyPriority.INTERACTIVE for w in group),
            len(group),
        )
        for model, group in grouped.items()
    }


def overdue(waiting: WaitingModel, now: float, bound_s: float) -> bool:
    """Whether the model's oldest request has waited the bound out: the switch happens now."""
    return now - waiting.oldest >= bound_s


def switch_order(waiters: Iterable[Waiter], now: float, bound_s: float) -> list[str]:
    """The waiting models, first to switch in first: overdue ones (oldest first), then those
    with an interactive request, then batch ones, oldest first within each."""

    def rank(waiting: WaitingModel) -> tuple[int, int, float, str]:
        if overdue(waiting, now, bound_s):
            return (0, 0, waiting.oldest, waiting.model)
        return (1, 0 if waiting.interactive else 1, waiting.oldest, waiting.model)

    return [w.model for w in sorted(waiting_models(waiters).values(), key=rank)]


def ahead_of(
    snapshot: FleetSnapshot, model: str, node: str, order: list[str], switching: Iterable[str]
) -> str | None:
    """A model before `model` in the swap queue that may also be placed on `node` and is not
    being placed yet: `model`'s switch there waits for it. None: `model` goes."""
    if model not in order:
        return None
    view = next((n for n in snapshot.nodes if n.name == node), None)
    if view is None:
        return None
    catalogue = view.catalogue()
    busy_switching = set(switching)
    for rival in order[: order.index(model)]:
        if rival in catalogue and rival not in busy_switching:
            return rival
    return None


def seconds_to_bound(waiting: WaitingModel | None, now: float, bound_s: float) -> float | None:
    """How long until the model becomes overdue (None: nobody waits for it)."""
    if waiting is None:
        return None
    return max(0.0, waiting.oldest + bound_s - now)


@dataclass(frozen=True)
class EvictionRules:
    """Who a plan for a waiting model may evict: `eligible` narrows the idle models (None:
    all), `yielding` lets busy ones go too (`plan_placement`'s arguments of the same names)."""

    eligible: Callable[[Resident], bool] | None
    yielding: bool


def eviction_rules(
    waiting: WaitingModel | None,
    clock: float,
    bound_s: float,
    min_resident_s: float,
    now: float,
) -> EvictionRules:
    """Before the bound, `min_resident_s` holds and busy models stay; once the model's oldest
    request has waited the bound out, neither holds: nothing waits longer than the bound for
    a model that is merely busy or freshly woken. `clock` is monotonic (the waiters'), `now`
    wall time (the residents')."""
    if waiting is not None and overdue(waiting, clock, bound_s):
        return EvictionRules(None, True)
    return EvictionRules(resident_for(min_resident_s, now), False)
