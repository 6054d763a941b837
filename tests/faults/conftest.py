"""Fixtures of the fault suite: the HTTP fakes and the moto-backed AWS world, and the processor's
log level put back after each test (a world built with other settings changes it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from channel_processor.observability import logger
from tests.fakes.openai_server import openai_fake_fixture  # noqa: F401  (fixture: openai_fake)
from tests.fakes.twilio_server import twilio_fake  # noqa: F401  (fixture: a fake Twilio per test)
from tests.integration.aws_world import aws  # noqa: F401  (fixture: moto + fakes + environment)


@pytest.fixture(autouse=True)
def restore_log_level() -> Iterator[None]:
    level = logger.log_level
    yield
    logger.setLevel(level)
