"""The torch engines' counters as the neuron's /metrics shows them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from neuron_agent.engine_metrics import render_engine_counters


def test_speculation_counters_are_prometheus_text_by_model() -> None:
    text = render_engine_counters(
        {
            "coder": {
                "running": 1,
                "speculative_verify_steps": 10,
                "speculative_sequence_steps": 12,
                "speculative_proposed_tokens": 40,
                "speculative_accepted_tokens": 30,
                "speculative_emitted_tokens": 42,
            },
            "chat": {"running": 0, "speculative_proposed_tokens": 0},
        }
    )
    samples = {
        (sample.name, sample.labels["model"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("cortex_engine_speculative_accepted_tokens_total", "coder")] == 30
    assert samples[("cortex_engine_speculative_emitted_tokens_total", "coder")] == 42
    assert samples[("cortex_engine_speculative_verify_steps_total", "coder")] == 10
    assert samples[("cortex_engine_speculative_acceptance_ratio", "coder")] == 0.75
    assert samples[("cortex_engine_speculative_proposed_tokens_total", "chat")] == 0
    assert ("cortex_engine_speculative_acceptance_ratio", "chat") not in samples
    assert ("cortex_engine_speculative_accepted_tokens_total", "chat") not in samples


def test_nothing_is_added_where_no_engine_reports_counters() -> None:
    assert render_engine_counters({"tiny": {"running": 0, "waiting": 0}}) == ""
    assert render_engine_counters({}) == ""
