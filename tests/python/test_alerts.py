"""The alerting rules shipped in docs/ against Prometheus's own rule engine (`promtool test
rules`), and the metrics they read as the real broker exposes them."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import Broker, Pki, wait_for
from runtime_client import Client

DOCS = Path(__file__).resolve().parents[2] / "docs"


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        message = "promtool is needed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        print(f"\n!!! SKIPPING: {message} (in CI this is a failure)\n")
        pytest.skip(message)
    return found


def test_the_dead_letter_alerts_fire_as_documented() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(DOCS / "prometheus-alerts.yml")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool, "test", "rules", str(DOCS / "prometheus-alerts.test.yml")],
                            capture_output=True, text=True, cwd=DOCS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_broker_exposes_the_metrics_the_alerts_read(pki: Pki, tmp_path: Path) -> None:
    broker = Broker.start(tmp_path, pki)
    try:
        async def dead_letter_one() -> None:
            alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
            a, b = await alice.connect(), await bob.connect()
            await alice.send(a.instance_id, "bob", "poison", {})
            delivery_id, _ = await b.delivery()
            b.nack(delivery_id, "poison", retryable=False)
            await asyncio.sleep(0.3)
            await a.close(), await b.close()
            await alice.close(), await bob.close()

        asyncio.run(dead_letter_one())

        def exposed() -> bool:
            _, _, body = broker.admin_get("/metrics")
            return ('mas_dead_letter_queue_length{agent="bob"} 1' in body
                    and "mas_dead_letter_queue_capacity 10000" in body
                    and 'mas_dead_letters_dropped{agent="bob"} 0' in body)

        assert wait_for(exposed, 10), broker.admin_get("/metrics")[2]
    finally:
        assert broker.stop() == 0
