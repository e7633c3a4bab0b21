"""Who is calling, what they may use, and how much: the gateway's client keys.

`KeyRing` turns an offered key into a `Caller` (its `[[keys]]` record, or an unnamed,
unlimited, interactive caller for the plain `[gateway] api_keys`), comparing it with every
configured digest in constant time (`cortex.secrets.KeyDigests`). `Gate` is the thin shell
around the pure limiter (`control_plane.limits`): before a request may reach a node it checks
the key's model patterns and limits, and afterwards it records the key's usage, under the key's
name (never the key), in Prometheus and in the gateway's status.

The caller of the request being served is kept in a context variable, set by the gateway's
auth middleware and read where the request is generated (`control_plane.generation`), so the
dialect adapters in between need not carry it.

Priority: a key's class (`interactive` or `batch`) travels with each of its requests to the
engine; a request may ask for a lower class than its key's with the header
`x-cortex-priority: batch`, never a higher one.
"""

from __future__ import annotations

import contextvars
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.errors import InvalidRequest, ModelForbidden, RateLimited
from control_plane.limits import KeyLimiter, Limits
from control_plane.metrics import GatewayMetrics
from cortex.config import UNNAMED_KEY, CortexConfig, KeyPriority
from cortex.secrets import KeyDigests

PRIORITY_HEADER = "x-cortex-priority"
# The caller on a gateway with no keys configured (loopback by default): anyone who reaches it
# may do anything, as before keys existed.
OPEN_NAME = "-"


@dataclass(frozen=True)
class Caller:
    name: str
    models: tuple[str, ...] = ("*",)
    priority: KeyPriority = KeyPriority.INTERACTIVE
    admin: bool = False
    limits: Limits = field(default_factory=Limits)

    def may_use(self, *names: str) -> bool:
        """Whether one of a model's names (as asked, as catalogued) matches the key's patterns."""
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in self.models)


OPEN_CALLER = Caller(OPEN_NAME, admin=True)


def parse_priority(value: str | None) -> KeyPriority | None:
    """The `x-cortex-priority` header's class, or InvalidRequest naming the header."""
    if value is None or not value.strip():
        return None
    try:
        return KeyPriority(value.strip().lower())
    except ValueError:
        raise InvalidRequest(
            f"{PRIORITY_HEADER}: expected 'interactive' or 'batch', got {value!r}",
            PRIORITY_HEADER,
        ) from None


def effective_priority(key: KeyPriority, asked: KeyPriority | None) -> KeyPriority:
    """A request may lower its key's class, never raise it."""
    if asked is KeyPriority.BATCH or key is KeyPriority.BATCH:
        return KeyPriority.BATCH
    return KeyPriority.INTERACTIVE


# What the engine is sent: Triton's convention of a smaller number first (0: the default).
ENGINE_PRIORITY = {KeyPriority.INTERACTIVE: 0, KeyPriority.BATCH: 1}


class KeyRing:
    """Every accepted key, as digests, and the caller each one is."""

    def __init__(self, config: CortexConfig) -> None:
        self._callers: dict[str, Caller] = {}
        plain = Caller(UNNAMED_KEY)
        for digest in config.gateway.key_digests():
            self._callers[digest] = plain
        self.records: list[Caller] = []
        for record in config.keys:
            found = Caller(
                record.name,
                record.models,
                record.priority,
                record.admin,
                Limits(record.rpm, record.tpm, record.max_concurrent),
            )
            self._callers[record.digest()] = found
            self.records.append(found)
        self._digests = KeyDigests(frozenset(self._callers))

    def __bool__(self) -> bool:
        return bool(self._callers)

    def identify(self, offered: list[str]) -> Caller | None:
        """The caller one of the offered keys belongs to, or None. Every offered key is compared
        with every digest, whichever matched."""
        found: Caller | None = None
        for given in offered:
            digest = self._digests.match(given)
            if digest is not None and found is None:
                found = self._callers[digest]
        return found


@dataclass
class Usage:
    """What one key has used since the gateway started (for its status and the console)."""

    requests: int = 0
    refused: int = 0
    rate_limited: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    in_flight: int = 0
    last_used: float | None = None  # wall-clock time


@dataclass
class Ticket:
    """An admitted request; `finish` exactly once when it ends."""

    gate: Gate
    caller: Caller
    _done: bool = field(default=False, repr=False)

    def finish(self, prompt_tokens: int, cached_tokens: int, output_tokens: int) -> None:
        if self._done:
            return
        self._done = True
        self.gate.finished(self, prompt_tokens, cached_tokens, output_tokens)


class Gate:
    """Model patterns, limits and usage per key, in front of every generation."""

    def __init__(
        self,
        ring: KeyRing,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.limiters = {c.name: KeyLimiter(c.limits) for c in ring.records if c.limits}
        self.usage: dict[str, Usage] = {c.name: Usage() for c in ring.records}

    def check_model(self, who: Caller, requested: str, canonical: str) -> None:
        if not who.may_use(requested, canonical):
            self._refused(who)
            raise ModelForbidden(requested)

    def admit(self, who: Caller, prompt_tokens: int) -> Ticket:
        """Take the request against the key's limits, or raise RateLimited (429)."""
        limiter = self.limiters.get(who.name)
        if limiter is not None:
            refusal = limiter.admit(self.clock(), prompt_tokens)
            if refusal is not None:
                self._refused(who)
                self.usage[who.name].rate_limited += 1
                self.metrics.key_rate_limited.labels(who.name, refusal.limit.value).inc()
                raise RateLimited(refusal.message, refusal.limit.value, refusal.retry_after)
        usage = self._usage(who)
        usage.in_flight += 1
        usage.last_used = time.time()
        return Ticket(self, who)

    def finished(
        self, ticket: Ticket, prompt_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None:
        name = ticket.caller.name
        limiter = self.limiters.get(name)
        if limiter is not None:
            limiter.finish(self.clock(), output_tokens)
        usage = self._usage(ticket.caller)
        usage.in_flight -= 1
        usage.requests += 1
        usage.input_tokens += prompt_tokens
        usage.cached_input_tokens += cached_tokens
        usage.output_tokens += output_tokens
        series = self.metrics.key_series(name)
        series.requests.inc()
        series.input_tokens.inc(prompt_tokens)
        series.cached_input_tokens.inc(cached_tokens)
        series.output_tokens.inc(output_tokens)

    def _usage(self, who: Caller) -> Usage:
        return self.usage.setdefault(who.name, Usage())

    def _refused(self, who: Caller) -> None:
        self._usage(who).refused += 1

    def status(self) -> dict[str, dict[str, object]]:
        """Usage per key name, with each key's limits and what is left of its windows."""
        now = self.clock()
        found: dict[str, dict[str, object]] = {}
        for name, usage in sorted(self.usage.items()):
            entry: dict[str, object] = dict(usage.__dict__)
            limiter = self.limiters.get(name)
            if limiter is not None:
                entry["limits"] = {
                    "rpm": limiter.limits.rpm,
                    "tpm": limiter.limits.tpm,
                    "max_concurrent": limiter.limits.max_concurrent,
                    "requests_last_minute": limiter.requests.used(now)
                    if limiter.requests
                    else None,
                    "tokens_last_minute": limiter.tokens.used(now) if limiter.tokens else None,
                }
            found[name] = entry
        return found


@dataclass(frozen=True)
class Client:
    """The request being served: who sent it, through which gate, at which priority."""

    gate: Gate
    caller: Caller
    asked: KeyPriority | None = None

    @property
    def priority(self) -> KeyPriority:
        return effective_priority(self.caller.priority, self.asked)

    def check_model(self, requested: str, canonical: str) -> None:
        self.gate.check_model(self.caller, requested, canonical)

    def admit(self, prompt_tokens: int) -> Ticket:
        return self.gate.admit(self.caller, prompt_tokens)


# Set by the gateway's auth middleware for each request; None where no gateway runs (a
# benchmark calling `generate` itself): no limits, interactive.
client: contextvars.ContextVar[Client | None] = contextvars.ContextVar("client", default=None)


def may_see(*names: str) -> bool:
    """Whether the request's key may use a model by one of these names (model lists show a key
    only what it may use; without a gateway, or without keys, everything)."""
    found = client.get()
    return found is None or found.caller.may_use(*names)
