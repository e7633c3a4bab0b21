"""One request's record: what it was, where it ran, how it ended. The gateway's metrics and its
one log line per request are both written from it, so they cannot disagree.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from control_plane.metrics import GatewayMetrics, RequestSeries
from cortex.neuron_api import RequestOutcome

log = logging.getLogger("cortex.requests")


@dataclass
class RequestRecord:
    request_id: str
    api: str
    model: str
    started: float = field(default_factory=time.monotonic)
    node: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, read from the engine's prefix cache
    completion_tokens: int = 0
    first_token_at: float | None = None
    # a RequestOutcome, or an error kind (`CortexError.kind`) for a request that failed
    outcome: str = RequestOutcome.API_ERROR

    def refused(self, metrics: GatewayMetrics, kind: str) -> None:
        """A request that ended before it reached a node (unknown model, invalid request, no
        room to load, a load that failed or took too long). No model label in its metric: the
        name comes from a client, and an unknown one must not make a series."""
        self.outcome = kind
        metrics.refused.labels(self.api, kind).inc()
        self._log(time.monotonic(), model="_".join(self.model.split())[:200] or "-")

    def served(self, series: RequestSeries) -> None:
        """A request that reached a node, however it ended: counted in its series and logged."""
        ended = time.monotonic()
        series.requests(self.outcome).inc()
        series.record_prompt(self.prompt_tokens, self.cached_prompt_tokens)
        series.output_tokens.inc(self.completion_tokens)
        series.duration.observe(ended - self.started)
        if self.first_token_at is not None and self.completion_tokens > 1:
            decode_time = ended - self.first_token_at
            series.inter_token.observe(decode_time / (self.completion_tokens - 1))
            if decode_time > 0:
                series.tokens_per_second.observe((self.completion_tokens - 1) / decode_time)
        self._log(ended, model=self.model)

    def _log(self, ended: float, model: str) -> None:
        """The one line per request: `key=value` pairs in text logs, fields in JSON logs."""
        ttft = self.first_token_at
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "model": model,
            "node": self.node,
            "api": self.api,
            "outcome": self.outcome,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": None if ttft is None else round(ttft - self.started, 4),
            "duration_s": round(ended - self.started, 4),
        }
        text = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
        log.info("request %s", text, extra=fields)
