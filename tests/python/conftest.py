"""Fixtures of the interop suite: the real `mas` binary as a process, certificates from
`mas dev-certs`, and a private redis-server per store run.

Brokers are shared by every test of a store (`--fresh-brokers` gives each test its own), so the
suite also shows that one long-running broker stays correct across repetitions (`--count N`).
"""

from __future__ import annotations

import pytest

from harness import Broker, Pki, RedisServer, STORES


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fresh-brokers",
        action="store_true",
        help="start a new broker (and redis-server) for every test instead of one per store",
    )
    parser.addoption(
        "--stores",
        default=",".join(STORES),
        help="comma-separated stores to run on (embedded, redis)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" in metafunc.fixturenames:
        wanted = [s for s in metafunc.config.getoption("--stores").split(",") if s]
        unknown = set(wanted) - set(STORES)
        if unknown:
            raise pytest.UsageError(f"unknown store(s): {sorted(unknown)}")
        metafunc.parametrize("store", wanted, scope="session")


def _broker_scope(fixture_name: str, config: pytest.Config) -> str:
    return "function" if config.getoption("--fresh-brokers") else "session"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope=_broker_scope)
def broker(store: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp(f"broker-{store}")
    redis = RedisServer.start(workdir) if store == "redis" else None
    broker = Broker.start(workdir, pki, redis_url=redis.url if redis else None)
    try:
        yield broker
    finally:
        code = broker.stop()
        if redis:
            redis.stop()
    assert code == 0, f"the broker exited {code} on SIGTERM; log: {broker.log_path}"
