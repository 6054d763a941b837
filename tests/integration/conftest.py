"""Fixtures shared by the integration tests: local fakes of the external HTTP services."""

from __future__ import annotations

from tests.fakes.twilio_server import twilio_fake  # noqa: F401  (fixture: a fake Twilio per test)
