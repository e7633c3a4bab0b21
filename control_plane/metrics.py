"""Gateway metrics (prometheus-client, `cortex_` prefix, labels model / node / api / outcome).

Buckets are chosen for LLM latencies: time to first token spans milliseconds (warm, short
prompt) to minutes (a cold load of a large model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200)


@dataclass
class RequestSeries:
    """The series one (model, node, api) records into, looked up once rather than per request
    (a `labels()` call takes a lock and builds its key every time)."""

    metrics: GatewayMetrics
    labels: tuple[str, str, str]
    ttft: Histogram
    inter_token: Histogram
    duration: Histogram
    tokens_per_second: Histogram
    input_tokens: Counter
    cached_input_tokens: Counter
    output_tokens: Counter
    in_flight: Gauge
    _requests: dict[str, Counter] = field(default_factory=dict)

    def requests(self, outcome: str) -> Counter:
        counter = self._requests.get(outcome)
        if counter is None:
            counter = self._requests[outcome] = self.metrics.requests.labels(*self.labels, outcome)
        return counter

    def record_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request's prompt: its size, the part read from the prefix cache, and the model's
        hit ratio on that node since this gateway started (over every API)."""
        self.input_tokens.inc(prompt_tokens)
        self.cached_input_tokens.inc(cached_tokens)
        model, node, _ = self.labels
        totals = self.metrics.prompt_totals.setdefault((model, node), [0, 0])
        totals[0] += cached_tokens
        totals[1] += prompt_tokens
        if totals[1]:
            self.metrics.prefix_cache_hit_ratio.labels(model, node).set(totals[0] / totals[1])


@dataclass
class KeySeries:
    """One client key's usage series, under the key's configured name (never the key)."""

    requests: Counter
    input_tokens: Counter
    cached_input_tokens: Counter
    output_tokens: Counter


class GatewayMetrics:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], RequestSeries] = {}
        self._key_series: dict[str, KeySeries] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ("model", "node", "api")
        self.requests = Counter(
            "cortex_requests", "Requests by outcome", (*labels, "outcome"), registry=r
        )
        # No model label: the names come from clients, and an unknown one must not make a series.
        self.refused = Counter(
            "cortex_requests_refused",
            "Requests answered with an error before they reached a node",
            ("api", "outcome"),
            registry=r,
        )
        self.input_tokens = Counter("cortex_input_tokens", "Prompt tokens", labels, registry=r)
        self.cached_input_tokens = Counter(
            "cortex_cached_input_tokens",
            "Prompt tokens the engine read from its prefix cache",
            labels,
            registry=r,
        )
        # (model, node) → [cached prompt tokens, prompt tokens] since start.
        self.prompt_totals: dict[tuple[str, str], list[int]] = {}
        self.prefix_cache_hit_ratio = Gauge(
            "cortex_prefix_cache_hit_ratio",
            "Share of prompt tokens read from the prefix cache, since the gateway started",
            ("model", "node"),
            registry=r,
        )
        self.output_tokens = Counter("cortex_output_tokens", "Generated tokens", labels, registry=r)
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Time from request to first generated token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "cortex_inter_token_latency_seconds",
            "Mean time between generated tokens, per request",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "Whole request duration",
            labels,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "cortex_output_tokens_per_second",
            "Output tokens per second of decoding, per request",
            labels,
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cortex_requests_in_flight", "Requests being served", ("model", "node"), registry=r
        )
        self.queue_wait = Histogram(
            "cortex_queue_wait_seconds",
            "Time a request waited for its model to be ready (cold load, queue)",
            ("model",),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge(
            "cortex_requests_waiting",
            "Requests waiting for their model's load, wake or switch (the swap queue), by class",
            ("model", "priority"),
            registry=r,
        )
        self.loads = Counter(
            "cortex_model_loads", "Model loads by outcome", ("model", "node", "outcome"), registry=r
        )
        self.load_seconds = Histogram(
            "cortex_model_load_seconds",
            "Time to load a model on a node",
            ("model", "node"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "cortex_evictions", "Model unloads by reason", ("model", "node", "reason"), registry=r
        )
        self.sleeps = Counter(
            "cortex_sleeps",
            "Models put to sleep (device memory released, process kept) by reason",
            ("model", "node", "reason"),
            registry=r,
        )
        self.wakes = Counter("cortex_wakes", "Sleeping models woken", ("model", "node"), registry=r)
        self.wake_seconds = Histogram(
            "cortex_model_wake_seconds",
            "Time to wake a sleeping model on a node (cortex_model_load_seconds: cold loads)",
            ("model", "node"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tier = Gauge(
            "cortex_model_tier",
            "1 for the residency tier each model copy is in (loaded, asleep) on each node",
            ("model", "node", "tier"),
            registry=r,
        )
        self.neuron_up = Gauge(
            "cortex_neuron_up", "1 when the neuron answers", ("node",), registry=r
        )
        self.pinned_unplaced = Gauge(
            "cortex_pinned_unplaced",
            "1 while a pinned model is not resident because it could not be placed",
            ("model",),
            registry=r,
        )
        self.memory_used = Gauge(
            "cortex_node_memory_used_bytes", "Device memory used", ("node", "gpu"), registry=r
        )
        self.memory_free = Gauge(
            "cortex_node_memory_free_bytes", "Device memory free", ("node", "gpu"), registry=r
        )

        # Per client key, by its name in cortex.toml (`unnamed` for the plain api_keys, `-` on a
        # gateway without keys): a bounded set chosen by the operator, never a client.
        self.key_requests = Counter(
            "cortex_key_requests",
            "Requests admitted and served, per client key",
            ("key",),
            registry=r,
        )
        self.key_input_tokens = Counter(
            "cortex_key_input_tokens", "Prompt tokens, per client key", ("key",), registry=r
        )
        self.key_cached_input_tokens = Counter(
            "cortex_key_cached_input_tokens",
            "Prompt tokens read from the prefix cache, per client key",
            ("key",),
            registry=r,
        )
        self.key_output_tokens = Counter(
            "cortex_key_output_tokens", "Generated tokens, per client key", ("key",), registry=r
        )
        self.key_rate_limited = Counter(
            "cortex_key_rate_limited",
            "Requests refused with 429 by a key's limit (requests, tokens, concurrency)",
            ("key", "limit"),
            registry=r,
        )

    def key_series(self, key: str) -> KeySeries:
        series = self._key_series.get(key)
        if series is None:
            series = self._key_series[key] = KeySeries(
                self.key_requests.labels(key),
                self.key_input_tokens.labels(key),
                self.key_cached_input_tokens.labels(key),
                self.key_output_tokens.labels(key),
            )
        return series

    def series(self, model: str, node: str, api: str) -> RequestSeries:
        key = (model, node, api)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = RequestSeries(
                self,
                key,
                ttft=self.ttft.labels(*key),
                inter_token=self.inter_token.labels(*key),
                duration=self.duration.labels(*key),
                tokens_per_second=self.tokens_per_second.labels(*key),
                input_tokens=self.input_tokens.labels(*key),
                cached_input_tokens=self.cached_input_tokens.labels(*key),
                output_tokens=self.output_tokens.labels(*key),
                in_flight=self.in_flight.labels(model, node),
            )
        return series
