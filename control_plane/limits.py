"""Per-key limits as plain data: requests and tokens per rolling minute, requests at once.

Pure: every method takes the time (`now`, monotonic seconds) from its caller and touches only
the limiter's own state, so the rules are tested without a clock or a server. The gateway's
shell (`control_plane.keys.Gate`) asks `admit` before a request may reach a node and calls
`finish` when it ends.

The windows are exact sliding windows (a log of what each request took), not token buckets:
within any 60 seconds a key gets at most `rpm` requests and `tpm` tokens, counting a request's
prompt when it is admitted and its output when it ends. Output is known only at the end, so a
key may overshoot `tpm` by the output of the requests it has in flight; the next request then
waits until the window has room again.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0


class Limit(enum.StrEnum):
    """Which limit refused a request (OpenAI's 429 `type` says requests or tokens too)."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENCY = "concurrency"


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def __bool__(self) -> bool:
        return any(value is not None for value in (self.rpm, self.tpm, self.max_concurrent))


@dataclass(frozen=True)
class Refusal:
    """Why a request may not go now, and when it may (None: never, it is larger than the
    limit itself)."""

    limit: Limit
    message: str
    retry_after_s: float | None

    @property
    def retry_after(self) -> int | None:
        """Whole seconds for a `Retry-After` header (at least 1)."""
        return None if self.retry_after_s is None else max(1, math.ceil(self.retry_after_s))


class SlidingWindow:
    """Amounts taken over the last `window_s` seconds, against a limit."""

    def __init__(self, limit: int, window_s: float = WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._entries: deque[tuple[float, int]] = deque()
        self._total = 0

    def used(self, now: float) -> int:
        self._expire(now)
        return self._total

    def wait(self, now: float, amount: int) -> float | None:
        """Seconds until `amount` more fits in the window (0.0: now; None: never)."""
        if amount > self.limit:
            return None
        self._expire(now)
        excess = self._total + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for taken_at, taken in self._entries:
            freed += taken
            if freed >= excess:
                return taken_at + self.window_s - now
        return self.window_s  # unreachable: the whole window frees more than `excess`

    def take(self, now: float, amount: int) -> None:
        self._expire(now)
        if amount > 0:
            self._entries.append((now, amount))
            self._total += amount

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._entries and self._entries[0][0] <= horizon:
            self._total -= self._entries.popleft()[1]


class KeyLimiter:
    """One key's limits and what it has used of them."""

    def __init__(self, limits: Limits, window_s: float = WINDOW_S) -> None:
        self.limits = limits
        self.requests = SlidingWindow(limits.rpm, window_s) if limits.rpm else None
        self.tokens = SlidingWindow(limits.tpm, window_s) if limits.tpm else None
        self.in_flight = 0

    def admit(self, now: float, prompt_tokens: int) -> Refusal | None:
        """Take one request of `prompt_tokens` if every limit allows it now (then the caller
        must `finish` it), or say which limit refuses and for how long."""
        limits = self.limits
        if limits.max_concurrent is not None and self.in_flight >= limits.max_concurrent:
            return Refusal(
                Limit.CONCURRENCY,
                f"this key has {self.in_flight} requests in flight, its limit "
                f"(max_concurrent {limits.max_concurrent})",
                1.0,
            )
        waits: list[tuple[float, Refusal]] = []
        if self.requests is not None:
            wait = self.requests.wait(now, 1)
            if wait:
                refusal = Refusal(
                    Limit.REQUESTS,
                    f"Rate limit reached on requests per minute (rpm): limit {limits.rpm}, "
                    f"used {self.requests.used(now)}; try again in {math.ceil(wait)} s",
                    wait,
                )
                waits.append((wait, refusal))
        if self.tokens is not None:
            wait = self.tokens.wait(now, prompt_tokens)
            if wait is None:
                return Refusal(
                    Limit.TOKENS,
                    f"Request too large for this key's tokens per minute (tpm): limit "
                    f"{limits.tpm}, requested {prompt_tokens}",
                    None,
                )
            if wait:
                refusal = Refusal(
                    Limit.TOKENS,
                    f"Rate limit reached on tokens per minute (tpm): limit {limits.tpm}, used "
                    f"{self.tokens.used(now)}, requested {prompt_tokens}; try again in "
                    f"{math.ceil(wait)} s",
                    wait,
                )
                waits.append((wait, refusal))
        if waits:
            return max(waits, key=lambda pair: pair[0])[1]
        if self.requests is not None:
            self.requests.take(now, 1)
        if self.tokens is not None:
            self.tokens.take(now, prompt_tokens)
        self.in_flight += 1
        return None

    def finish(self, now: float, output_tokens: int) -> None:
        """An admitted request ended, having generated `output_tokens`."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.tokens is not None:
            self.tokens.take(now, output_tokens)
