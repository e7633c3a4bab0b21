"""The console at /ui in a real browser: Debian's headless Chromium driven by Selenium, against
the replay fleet (a real neuron and Triton behind a gateway with `[[keys]]`; conftest.py).

The page asks for a key and shows nothing without one; with the admin key it shows the node and
the models, and its Load / Unload, Pin / Unpin and Sleep / Wake buttons change the neuron's own
/status (sleep on `SLEEPER`, the torch-engine model; the replay fakes get no Sleep button); a
read-only key sees no buttons and is refused if it calls the actions anyway. A screenshot is kept under
`artifacts/console/` (CI keeps that folder; `CORTEX_ARTIFACTS` moves it).

Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`; scripts/check.sh
installs them in CI); without them the test is skipped, unless CORTEX_REQUIRE_VALIDATORS=1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import KEYS, SLEEPER, ReplayFleet

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CORTEX_ARTIFACTS", REPO / "artifacts")) / "console"
WAIT_S = 30


def _program(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CORTEX_REQUIRE_VALIDATORS") == "1":
        pytest.fail(f"{names[0]} is not installed (CORTEX_REQUIRE_VALIDATORS=1)")
    pytest.skip(f"{names[0]} is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _program("chromium", "chromium-browser")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(_program("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """`check()`'s first true value; the page redraws its tables every refresh, so an element
    found a moment ago may be gone: such a try is simply made again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # No driver: `check()` finds its own elements (selenium types the driver as required).
    return WebDriverWait(  # type: ignore[type-var]
        None, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda _: check(), message=f"waited {timeout} s for {what}")


def click(what: str, find: Callable[[], Any]) -> None:
    """Find and click in one try (retried while the element is redrawn under it)."""

    def clicked() -> bool:
        element = find()
        if element is None:
            return False
        element.click()
        return True

    wait_for(what, clicked)


def neuron_pinned(fleet: ReplayFleet, model: str) -> bool:
    catalogue = httpx.get(f"{fleet.neuron_url}/status", timeout=10).json()["catalogue"]
    return bool(next(e for e in catalogue if e["profile"]["name"] == model)["profile"]["pinned"])


def neuron_state(fleet: ReplayFleet, model: str) -> str | None:
    status = httpx.get(f"{fleet.neuron_url}/status", timeout=10).json()
    return next((m["state"] for m in status["loaded"] if m["name"] == model), None)


def sign_in(browser: Any, fleet: ReplayFleet, key: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{fleet.root_url}/ui")
    form = wait_for("the key form", lambda: browser.find_element(By.ID, "key-form"))
    wait_for("the sign-in section", form.is_displayed)
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()


def row(browser: Any, model: str) -> Any:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, f'#models tr[data-model="{model}"]')
    return found[0] if found else None


def button(browser: Any, model: str, action: str) -> Any:
    """The row's button for `action` (its data-action), or None while there is none."""
    from selenium.webdriver.common.by import By

    found = row(browser, model)
    if found is None:
        return None
    buttons = found.find_elements(By.CSS_SELECTOR, f'button[data-action="{action}"]')
    return buttons[0] if buttons else None


def test_the_console_shows_the_fleet_and_acts_for_admin_keys_only(
    browser: Any, replay_fleet: ReplayFleet
) -> None:
    from selenium.webdriver.common.by import By

    # Without a key: the key form, and no data.
    browser.get(f"{replay_fleet.root_url}/ui")
    wait_for("the key form", lambda: browser.find_element(By.ID, "sign-in").is_displayed())
    assert not browser.find_element(By.ID, "console").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    sign_in(browser, replay_fleet, "sk-not-a-key")
    wait_for(
        "the refusal", lambda: "not accepted" in browser.find_element(By.ID, "sign-in-error").text
    )

    # The admin key: the node and both models.
    sign_in(browser, replay_fleet, str(KEYS["admin"]["key"]))
    wait_for("both models", lambda: row(browser, "replay-hermes") and row(browser, "replay-llama3"))
    wait_for(
        "the node",
        lambda: browser.find_elements(By.CSS_SELECTOR, '#nodes tr[data-node="replay-node"]'),
    )
    assert "(admin)" in browser.find_element(By.ID, "who").text

    # Load from the page: the neuron's own /status says READY, then the page shows it.
    model = "replay-llama3"
    if neuron_state(replay_fleet, model) is not None:
        httpx.post(
            f"{replay_fleet.neuron_url}/models/unload", json={"model": model}, timeout=30
        ).raise_for_status()
        wait_for("the page to see it unloaded", lambda: "not loaded" in row(browser, model).text)
    load = wait_for(
        "the Load button",
        lambda: next(
            (
                b
                for b in row(browser, model).find_elements(By.TAG_NAME, "button")
                if b.text == "Load"
            ),
            None,
        ),
    )
    load.click()
    wait_for("the neuron to hold the model", lambda: neuron_state(replay_fleet, model) == "READY")
    wait_for("the page to show it", lambda: "replay-node loaded" in row(browser, model).text)

    # Unload asks first; dismissed, nothing happens; accepted, the neuron lets it go.
    def unload_button() -> Any:
        buttons = row(browser, model).find_elements(By.TAG_NAME, "button")
        return next((b for b in buttons if b.text.startswith("Unload")), None)

    click("the Unload button", unload_button)
    wait_for("the confirmation", lambda: browser.switch_to.alert).dismiss()
    assert neuron_state(replay_fleet, model) == "READY"
    click("the Unload button", unload_button)
    wait_for("the confirmation", lambda: browser.switch_to.alert).accept()
    wait_for("the neuron to drop the model", lambda: neuron_state(replay_fleet, model) is None)
    wait_for("the page to show it", lambda: "not loaded" in row(browser, model).text)

    # Pin: the neuron's catalogue says pinned, and so does the page; the pinned model's Unload
    # is disabled until it is unpinned.
    pinned = "replay-hermes"
    click("the Pin button", lambda: button(browser, pinned, "pin"))
    wait_for("the neuron to pin it", lambda: neuron_pinned(replay_fleet, pinned))
    wait_for("the page to show it pinned", lambda: "pinned" in row(browser, pinned).text)
    wait_for("the pinned copy", lambda: "replay-node loaded" in row(browser, pinned).text)
    # In a wait: the table is redrawn every refresh, so an element found may go stale.
    wait_for("Unload disabled", lambda: not button(browser, pinned, "unload").is_enabled())

    # Sleep asks first; then the neuron's tier is ASLEEP and the page says asleep; Wake brings
    # it back. A model whose engine cannot sleep has no Sleep button.
    assert button(browser, pinned, "sleep") is None
    if neuron_state(replay_fleet, SLEEPER) is None:  # test_console_actions may have loaded it
        click("the sleeper's Load button", lambda: button(browser, SLEEPER, "load"))
    wait_for("the sleeper", lambda: neuron_state(replay_fleet, SLEEPER) == "READY", 120)
    click("the Sleep button", lambda: button(browser, SLEEPER, "sleep"))
    wait_for("the confirmation", lambda: browser.switch_to.alert).accept()
    wait_for(
        "the neuron to put it to sleep", lambda: neuron_state(replay_fleet, SLEEPER) == "ASLEEP"
    )
    wait_for(
        "the page to show it asleep", lambda: "replay-node asleep" in row(browser, SLEEPER).text
    )
    assert button(browser, SLEEPER, "sleep") is None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console.png"))
    click("the Wake button", lambda: button(browser, SLEEPER, "wake"))
    wait_for("the neuron to wake it", lambda: neuron_state(replay_fleet, SLEEPER) == "READY")
    wait_for("the page to show it", lambda: "replay-node loaded" in row(browser, SLEEPER).text)

    click("the Unpin button", lambda: button(browser, pinned, "unpin"))
    wait_for("the neuron to unpin it", lambda: not neuron_pinned(replay_fleet, pinned))
    wait_for("the Unload button back", lambda: button(browser, pinned, "unload").is_enabled())

    # A read-only key: the same page, no buttons, and the actions refused if called anyway.
    browser.find_element(By.ID, "sign-out").click()
    sign_in(browser, replay_fleet, str(KEYS["viewer"]["key"]))
    wait_for("the models", lambda: row(browser, model))
    wait_for("the viewer's name", lambda: "(read-only)" in browser.find_element(By.ID, "who").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#models button")
    assert not browser.find_element(By.ID, "errors-section").is_displayed()
    answer = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch("/ui/api/models/load", {method: "POST", headers: {
            "content-type": "application/json",
            "authorization": "Bearer " + sessionStorage.getItem("cortex-console-key")},
          body: JSON.stringify({model: arguments[0]})})
          .then(async (r) => done([r.status, await r.json()]));""",
        model,
    )
    assert answer[0] == 403 and answer[1]["error"]["code"] == "permission_denied"
    assert neuron_state(replay_fleet, model) is None


def test_the_console_api_needs_a_key_and_the_page_holds_no_data(
    replay_fleet: ReplayFleet,
) -> None:
    page = httpx.get(f"{replay_fleet.root_url}/ui/")
    assert page.status_code == 200 and "<title>cortex console</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "replay-hermes" not in page.text
    assert httpx.get(f"{replay_fleet.root_url}/ui/console.js").status_code == 200
    assert httpx.get(f"{replay_fleet.root_url}/ui/..%2Fpyproject.toml").status_code == 404
    refused = httpx.get(f"{replay_fleet.root_url}/ui/api/state")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    viewer = {"authorization": f"Bearer {KEYS['viewer']['key']}"}
    state = httpx.get(f"{replay_fleet.root_url}/ui/api/state", headers=viewer).json()
    assert state["you"]["admin"] is False
    assert list(state["keys"]) == ["viewer"]  # its own usage only
    assert state["errors"] == []
    unload = httpx.post(
        f"{replay_fleet.root_url}/ui/api/models/unload",
        json={"model": "replay-hermes", "node": "replay-node"},
        headers=viewer,
    )
    assert unload.status_code == 403
    admin = {"authorization": f"Bearer {KEYS['admin']['key']}"}
    bad = httpx.post(
        f"{replay_fleet.root_url}/ui/api/models/load", json={"model": 5}, headers=admin
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
