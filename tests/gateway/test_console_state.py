"""The console's recent errors: a logging handler that keeps failed requests and warnings."""

from __future__ import annotations

import logging

from control_plane.console.state import RecentErrors


def test_recent_errors_keep_failed_requests_and_warnings_only() -> None:
    recent = RecentErrors(size=3)
    log = logging.getLogger("cortex.test-recent")
    log.addHandler(recent)
    log.setLevel(logging.INFO)
    try:
        log.info("request ok", extra={"outcome": "ok", "model": "m"})
        log.info("request limited", extra={"outcome": "rate_limit_error", "model": "m"})
        log.info("an ordinary line")
        log.warning("node down")
        log.warning("node down again")
    finally:
        log.removeHandler(recent)
    # Successful requests and plain INFO lines never enter.
    assert [e["message"] for e in recent.recent()] == [
        "request limited",
        "node down",
        "node down again",
    ]
    assert recent.recent()[0]["outcome"] == "rate_limit_error"
