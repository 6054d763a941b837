"""Shared fixtures: a clean environment for every test, and one moto server per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Variables a developer's shell may carry that would change what a test reads.
_LEAKY_PREFIXES = ("AWS_", "CP_", "OPENAI_", "TWILIO_", "POWERTOOLS_", "LOG_LEVEL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_LEAKY_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    # boto3 needs some credentials even against moto; these are moto's conventional dummies.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto server (DynamoDB, SQS, Secrets Manager) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture()
def moto_reset(moto_endpoint: str) -> str:
    """Empty the moto server's state so each test starts from nothing."""
    import urllib.request

    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    return moto_endpoint


@pytest.fixture(autouse=True)
def log_level_info() -> None:
    """The CLI lowers the shared logger's level; every test starts from INFO again."""
    from channel_processor.observability import set_level

    set_level("INFO")
