"""The torch engine's own counters as Prometheus text, for the neuron's /metrics.

Each torch model's engine writes its counters into its stats file (beside the running and
waiting counts the neuron already reads); the neuron appends them, labelled by model, to the
Triton metrics it re-exports. Speculative decoding's are the first: per model, verify passes,
sequence-steps that guessed, tokens proposed, accepted and emitted, and the acceptance ratio.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# stats-file key → (metric name without _total, help)
SPECULATION_COUNTERS = {
    "speculative_verify_steps": (
        "cortex_engine_speculative_verify_steps",
        "Forward passes that verified guessed tokens",
    ),
    "speculative_sequence_steps": (
        "cortex_engine_speculative_sequence_steps",
        "Sequence-steps that had guesses verified",
    ),
    "speculative_proposed_tokens": (
        "cortex_engine_speculative_proposed_tokens",
        "Guessed tokens sent to verification",
    ),
    "speculative_accepted_tokens": (
        "cortex_engine_speculative_accepted_tokens",
        "Guessed tokens the model agreed with",
    ),
    "speculative_emitted_tokens": (
        "cortex_engine_speculative_emitted_tokens",
        "Tokens emitted by sequence-steps that guessed (accepted guesses + one of the model's)",
    ),
}


class _EngineCounters(Collector):
    def __init__(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for key, (name, documentation) in SPECULATION_COUNTERS.items():
            family = CounterMetricFamily(name, documentation, labels=["model"])
            for model, values in self.stats.items():
                if key in values:
                    family.add_metric([model], values[key])
            yield family
        ratio = GaugeMetricFamily(
            "cortex_engine_speculative_acceptance_ratio",
            "Accepted over proposed guessed tokens since the model loaded",
            labels=["model"],
        )
        for model, values in self.stats.items():
            proposed = values.get("speculative_proposed_tokens", 0.0)
            if proposed > 0:
                ratio.add_metric([model], values.get("speculative_accepted_tokens", 0.0) / proposed)
        yield ratio


def render_engine_counters(stats: Mapping[str, Mapping[str, float]]) -> str:
    """Prometheus text for each model's engine counters (`stats`: model → its stats file's
    numbers); empty when no model reports any."""
    if not any(key in values for values in stats.values() for key in SPECULATION_COUNTERS):
        return ""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCounters(stats))
    return generate_latest(registry).decode()
