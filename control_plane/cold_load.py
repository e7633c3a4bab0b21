"""What a cold load does next, as a pure decision: place the model, wait for the fleet to
change, or give up with the error the client sees. `Fleet` drives it (polls, loads, waits);
nothing here does I/O or reads a clock of its own.

The rules:
  - a plan that places the model is carried out;
  - a refusal that waiting can end (`Refusal.wait`: a load, unload or re-placement under way,
    requests in flight on the only models that could leave) waits for the fleet to change,
    until the load's deadline; past it the load times out (504), naming what stood in the way;
  - a refusal waiting cannot end is a 503 (`Overloaded`) with the planner's reasons, unless a
    load already failed on some node (then 502, `UpstreamFailed`, with each node's error);
  - a node that refuses the load itself (409: no room after all, a victim got busy) is tried
    again after a wait, and left out after `REFUSALS_PER_NODE` refusals; a node whose load
    failed any other way is left out at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from control_plane.errors import CortexError, Overloaded, UpstreamFailed, UpstreamTimeout
from control_plane.lifecycle import Placement, Refusal

# How long one wait lasts at most before the planner looks again (the shell also wakes on any
# change it makes itself: a load or unload done, a request finished, a poll).
WAIT_STEP_S = 1.0
# Refusals by one node's neuron (its own memory check, a victim busy after all) before the
# load leaves that node out.
REFUSALS_PER_NODE = 3


@dataclass(frozen=True)
class Place:
    placement: Placement


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


@dataclass(frozen=True)
class GiveUp:
    error: CortexError


Step = Place | Wait | GiveUp


@dataclass
class ColdLoad:
    """One cold load's attempts: where it failed, and what to do after each plan."""

    model: str
    deadline: float  # monotonic seconds
    timeout_s: float
    _failed: set[str] = field(default_factory=set)
    _refused: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def exclude(self) -> frozenset[str]:
        """Nodes the planner must leave out."""
        crowded = {node for node, count in self._refused.items() if count >= REFUSALS_PER_NODE}
        return frozenset(self._failed | crowded)

    def next_step(self, plan: list[Placement] | Refusal, now: float) -> Step:
        if not isinstance(plan, Refusal):
            return Place(plan[0])
        if plan.wait:
            if now < self.deadline:
                return Wait(min(WAIT_STEP_S, self.deadline - now), plan.reason)
            return GiveUp(
                UpstreamTimeout(
                    f"{self.model} was not ready within {self.timeout_s:.0f} s: {plan.reason}"
                )
            )
        if self._failed:
            return GiveUp(
                UpstreamFailed(f"{self.model} could not be loaded: " + "; ".join(self.errors))
            )
        reasons = "; ".join([*self.errors, plan.reason])
        return GiveUp(Overloaded(f"cannot place {self.model}: {reasons}", retry_after=30))

    def failed_on(self, node: str, error: CortexError) -> Wait | None:
        """A placement on `node` failed: a wait before the next plan (the node refused, and may
        take it once what it is busy with is done), or None to plan again at once."""
        self.errors.append(f"{node}: {error.message}")
        if isinstance(error, Overloaded):
            self._refused[node] = self._refused.get(node, 0) + 1
            return Wait(WAIT_STEP_S / 2, error.message)
        self._failed.add(node)
        return None
