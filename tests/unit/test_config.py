"""Settings from the environment: typed, validated once, errors that name the variable."""

from __future__ import annotations

import pytest

from channel_processor.config import Settings
from channel_processor.errors import ConfigurationError


def test_lambda_defaults_to_aws_back_ends_and_the_cli_to_embedded_ones() -> None:
    aws, local = Settings.from_env({}), Settings.from_env({}, local=True)
    assert (aws.store, aws.composer, aws.sender, aws.secrets) == (
        "dynamodb",
        "openai",
        "twilio",
        "secretsmanager",
    )
    assert (local.store, local.composer, local.sender, local.secrets) == (
        "sqlite",
        "offline",
        "sandbox",
        "local",
    )


def test_environment_values_are_parsed_and_explicit_arguments_win() -> None:
    env = {"CP_STORE": "SQLite", "CP_MAX_RECEIVE_COUNT": "7", "CP_LEASE_SECONDS": "90.5"}
    settings = Settings.from_env(env, lease_seconds=30.0)
    assert (settings.store, settings.max_receive_count, settings.lease_seconds) == (
        "sqlite",
        7,
        30.0,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CP_MAX_RECEIVE_COUNT": "five"}, "CP_MAX_RECEIVE_COUNT"),
        ({"CP_STORE": "postgres"}, "CP_STORE"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ({"CP_HEARTBEAT_INTERVAL_SECONDS": "100"}, "CP_HEARTBEAT_INTERVAL_SECONDS"),
        ({"CP_HEARTBEAT_EXTENSION_SECONDS": "50000"}, "CP_HEARTBEAT_EXTENSION_SECONDS"),
        ({"CP_SEND_SETTLE_SECONDS": "-5"}, "CP_SEND_SETTLE_SECONDS"),
        ({"CP_CLOCK_SKEW_SECONDS": "-1"}, "CP_CLOCK_SKEW_SECONDS"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        Settings.from_env(env)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"CP_STORE": "x", "CP_SENDER": "y"})
    assert "CP_STORE" in str(caught.value) and "CP_SENDER" in str(caught.value)
