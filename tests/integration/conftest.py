"""Fixtures shared by the integration tests: local fakes of the external HTTP services and an AWS
account on moto's server wired into the environment the entry points read."""

from __future__ import annotations

from tests.fakes.openai_server import openai_fake_fixture  # noqa: F401  (fixture: openai_fake)
from tests.fakes.twilio_server import twilio_fake  # noqa: F401  (fixture: a fake Twilio per test)
from tests.integration.aws_world import aws  # noqa: F401  (fixture: moto + fakes + environment)
