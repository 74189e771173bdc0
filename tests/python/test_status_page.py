"""The status page in real headless Chromium (Debian `chromium` + `chromium-driver`, driven by
selenium): it shows the agents of a running broker, a dead letter appears after a poison
message without a reload, an audit verification shows up, no payload reaches the page, and
the CSP lets only the page's own script run. A screenshot is kept in $MAS_ARTIFACTS_DIR."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from harness import MAS_BIN, Broker, Pki
from runtime_client import Client

ARTIFACTS = Path(os.environ.get("MAS_ARTIFACTS_DIR", "."))


@pytest.fixture
def browser():
    driver_path = shutil.which("chromedriver")
    if not driver_path or not shutil.which("chromium"):
        message = "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        print(f"\n!!! SKIPPING the browser test: {message} (in CI this is a failure)\n")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_in_page(driver, script: str, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(script))


def test_the_status_page_shows_agents_and_a_new_dead_letter_without_a_reload(browser, pki: Pki,
                                                                              tmp_path: Path) -> None:
    broker = Broker.start(tmp_path, pki)
    try:
        url = f"http://{broker.admin_addr}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp

        async def main():
            alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
            a, b = await alice.connect(), await bob.connect()

            browser.get(url)
            sessions = wait_in_page(browser, """
                const row = document.querySelector('#agents tr[data-agent="bob"]');
                const cell = row && row.querySelector('.sessions');
                return cell && cell.textContent !== 'none' ? cell.textContent : null;""")
            assert sessions == b.instance_id, "bob's session on this broker is shown"
            browser.execute_script("window.notReloaded = true;")

            secret = f"payload-{uuid.uuid4().hex}"
            message_id = await alice.send(a.instance_id, "bob", "poison", {"secret": secret})
            delivery_id, _ = await b.delivery()
            b.nack(delivery_id, "poison", retryable=False)

            # In a thread, so the event loop keeps running and bob's nack goes out meanwhile.
            shown = await asyncio.to_thread(wait_in_page, browser, f"""
                const row = document.querySelector('#dead-letters tr[data-message-id="{message_id}"]');
                const count = document.querySelector('#agents tr[data-agent="bob"] .dead-letters');
                return row && count && count.textContent === '1' ? row.querySelector('.reason').textContent : null;""")
            assert shown == "poison"
            assert browser.execute_script("return window.notReloaded === true;"), "updated in place, not reloaded"
            assert secret not in browser.page_source, "no payload on the page"
            ops = pki.operator("ops")
            verified = subprocess.run(
                [MAS_BIN, "admin", "--addr", broker.target, "--ca", str(ops.ca), "--cert", str(ops.cert),
                 "--key", str(ops.key), "audit", "verify"], capture_output=True, text=True, timeout=30)
            assert verified.returncode == 0, verified.stderr
            verdict = await asyncio.to_thread(wait_in_page, browser, """
                const text = document.getElementById('verification').textContent;
                return text.startsWith('intact') ? text : null;""")
            assert "1 chain, 1 record" in verdict, verdict  # bob's chain: one dead-lettered admission
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "status-page.png"))
            await a.close(), await b.close()
            await alice.close(), await bob.close()

        asyncio.run(main())
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], f"the page logged errors (a CSP violation would show here): {errors}"
        assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000
    finally:
        assert broker.stop() == 0
