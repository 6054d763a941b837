"""Settings, read from the environment once, in this module only, into a typed object.

Precedence: explicit argument (``Settings(...)`` / ``replace``), then environment, then default.
Lambda defaults to the AWS back ends, the CLI to the embedded ones (``Settings.from_env(local=True)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from channel_processor.errors import ConfigurationError

PREFIX = "CP_"

ENV_STORE = "CP_STORE"  # dynamodb | sqlite
ENV_COMPOSER = "CP_COMPOSER"  # openai | offline
ENV_SENDER = "CP_SENDER"  # twilio | sandbox
ENV_SECRETS = "CP_SECRETS"  # secretsmanager | local
ENV_METRICS = "CP_METRICS"  # emf | memory
ENV_METRICS_NAMESPACE = "POWERTOOLS_METRICS_NAMESPACE"
ENV_SERVICE_NAME = "POWERTOOLS_SERVICE_NAME"
ENV_TABLE_NAME = "CP_TABLE_NAME"
ENV_QUEUE_URL = "CP_QUEUE_URL"
ENV_DLQ_URL = "CP_DLQ_URL"
ENV_REPAIR_QUEUE_URL = "CP_REPAIR_QUEUE_URL"
ENV_REGION = "AWS_REGION"
ENV_SQLITE_PATH = "CP_SQLITE_PATH"
ENV_LOCAL_CONFIG = "CP_LOCAL_CONFIG"
ENV_HEARTBEAT_INTERVAL = "CP_HEARTBEAT_INTERVAL_SECONDS"
ENV_HEARTBEAT_EXTENSION = "CP_HEARTBEAT_EXTENSION_SECONDS"
ENV_MAX_RECEIVE_COUNT = "CP_MAX_RECEIVE_COUNT"
ENV_LEASE_SECONDS = "CP_LEASE_SECONDS"
ENV_SEND_SETTLE_SECONDS = "CP_SEND_SETTLE_SECONDS"
ENV_CLOCK_SKEW_SECONDS = "CP_CLOCK_SKEW_SECONDS"
ENV_OPENAI_TIMEOUT = "CP_OPENAI_TIMEOUT_SECONDS"
ENV_TWILIO_TIMEOUT = "CP_TWILIO_TIMEOUT_SECONDS"
ENV_OPENAI_MODEL = "CP_OPENAI_MODEL"
ENV_OPENAI_BASE_URL = "CP_OPENAI_BASE_URL"
ENV_TWILIO_BASE_URL = "CP_TWILIO_BASE_URL"
ENV_STATUS_CALLBACK_URL = "CP_STATUS_CALLBACK_URL"
ENV_SECRETS_TTL = "CP_SECRETS_TTL_SECONDS"
ENV_BATCH_CONCURRENCY = "CP_BATCH_CONCURRENCY"
ENV_COMPOSE_ATTEMPTS = "CP_COMPOSE_ATTEMPTS"
ENV_FINAL_UPDATE_ATTEMPTS = "CP_FINAL_UPDATE_ATTEMPTS"
ENV_DEFAULT_REGION = "CP_DEFAULT_PHONE_REGION"
ENV_LOG_LEVEL = "LOG_LEVEL"

STORES = ("dynamodb", "sqlite")
COMPOSERS = ("openai", "offline")
SENDERS = ("twilio", "sandbox")
SECRET_SOURCES = ("secretsmanager", "local")
METRICS = ("emf", "memory")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    store: str = "dynamodb"
    composer: str = "openai"
    sender: str = "twilio"
    secrets: str = "secretsmanager"
    metrics: str = "emf"
    metrics_namespace: str = "WhatsAppChannelProcessor"
    service_name: str = "whatsapp-channel-processor"  # the "service" key of logs and metrics
    table_name: str = "conversations"
    queue_url: str | None = None
    dlq_url: str | None = None
    repair_queue_url: str | None = None
    region: str | None = None
    sqlite_path: str = ".channel-processor/local.db"
    local_config: str | None = None
    # The heartbeat asks for ``extension`` more seconds every ``interval``: interval < extension so a
    # late tick never lets the message reappear.
    heartbeat_interval_seconds: float = 20.0
    heartbeat_extension_seconds: int = 60
    max_receive_count: int = 5
    lease_seconds: float = 120.0
    send_settle_seconds: float = 60.0
    clock_skew_seconds: float = 30.0
    openai_timeout_seconds: float = 20.0
    twilio_timeout_seconds: float = 10.0
    openai_model: str = "gpt-4.1-mini"
    openai_base_url: str | None = None
    twilio_base_url: str | None = None
    status_callback_url: str | None = None
    secrets_ttl_seconds: float = 300.0
    batch_concurrency: int = 4
    compose_attempts: int = 3
    final_update_attempts: int = 3
    default_phone_region: str | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        problems = []

        def bad(name: str, rule: str) -> None:
            # Name the environment variable too: that is what an operator has to change.
            var = _ENV_OF_FIELD.get(name)
            problems.append(f"{name} ({var}) {rule}" if var else f"{name} {rule}")

        for name, allowed in (
            ("store", STORES),
            ("composer", COMPOSERS),
            ("sender", SENDERS),
            ("secrets", SECRET_SOURCES),
            ("metrics", METRICS),
        ):
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.log_level not in LOG_LEVELS:
            bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.heartbeat_interval_seconds <= 0:
            bad("heartbeat_interval_seconds", "must be > 0")
        if not 0 < self.heartbeat_extension_seconds <= 43_200:
            bad("heartbeat_extension_seconds", "must be in 1..43200 (SQS's 12-hour cap)")
        if self.heartbeat_interval_seconds >= self.heartbeat_extension_seconds:
            bad(
                "heartbeat_interval_seconds",
                f"must be shorter than heartbeat_extension_seconds "
                f"({_ENV_OF_FIELD['heartbeat_extension_seconds']})",
            )
        for name in (
            "max_receive_count",
            "batch_concurrency",
            "compose_attempts",
            "final_update_attempts",
        ):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("lease_seconds", "openai_timeout_seconds", "twilio_timeout_seconds"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        for name in ("send_settle_seconds", "clock_skew_seconds", "secrets_ttl_seconds"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if problems:
            raise ConfigurationError("invalid settings: " + "; ".join(problems))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, local: bool = False, **overrides: Any
    ) -> Settings:
        """Build from the environment; ``local`` picks the embedded back ends as defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if local:
            values.update(
                store="sqlite",
                composer="offline",
                sender="sandbox",
                secrets="local",
                metrics="memory",
                log_level="ERROR",
            )
        problems: list[str] = []
        for f in fields(cls):
            var = _ENV_OF_FIELD.get(f.name)
            raw = env.get(var) if var else None
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _PARSERS.get(f.name, str)(raw.strip())
            except ValueError:
                problems.append(f"{var}={raw!r} is not a valid {_KIND.get(f.name, 'value')}")
        if problems:
            raise ConfigurationError("invalid environment: " + "; ".join(problems))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("log_level"), str):
            values["log_level"] = values["log_level"].upper()
        return cls(**values)


_ENV_OF_FIELD = {
    "store": ENV_STORE,
    "composer": ENV_COMPOSER,
    "sender": ENV_SENDER,
    "secrets": ENV_SECRETS,
    "metrics": ENV_METRICS,
    "metrics_namespace": ENV_METRICS_NAMESPACE,
    "service_name": ENV_SERVICE_NAME,
    "table_name": ENV_TABLE_NAME,
    "queue_url": ENV_QUEUE_URL,
    "dlq_url": ENV_DLQ_URL,
    "repair_queue_url": ENV_REPAIR_QUEUE_URL,
    "region": ENV_REGION,
    "sqlite_path": ENV_SQLITE_PATH,
    "local_config": ENV_LOCAL_CONFIG,
    "heartbeat_interval_seconds": ENV_HEARTBEAT_INTERVAL,
    "heartbeat_extension_seconds": ENV_HEARTBEAT_EXTENSION,
    "max_receive_count": ENV_MAX_RECEIVE_COUNT,
    "lease_seconds": ENV_LEASE_SECONDS,
    "send_settle_seconds": ENV_SEND_SETTLE_SECONDS,
    "clock_skew_seconds": ENV_CLOCK_SKEW_SECONDS,
    "openai_timeout_seconds": ENV_OPENAI_TIMEOUT,
    "twilio_timeout_seconds": ENV_TWILIO_TIMEOUT,
    "openai_model": ENV_OPENAI_MODEL,
    "openai_base_url": ENV_OPENAI_BASE_URL,
    "twilio_base_url": ENV_TWILIO_BASE_URL,
    "status_callback_url": ENV_STATUS_CALLBACK_URL,
    "secrets_ttl_seconds": ENV_SECRETS_TTL,
    "batch_concurrency": ENV_BATCH_CONCURRENCY,
    "compose_attempts": ENV_COMPOSE_ATTEMPTS,
    "final_update_attempts": ENV_FINAL_UPDATE_ATTEMPTS,
    "default_phone_region": ENV_DEFAULT_REGION,
    "log_level": ENV_LOG_LEVEL,
}

T = TypeVar("T")


def _lower(raw: str) -> str:
    return raw.lower()


_PARSERS: dict[str, Callable[[str], Any]] = {
    "store": _lower,
    "composer": _lower,
    "sender": _lower,
    "secrets": _lower,
    "metrics": _lower,
    "heartbeat_interval_seconds": float,
    "heartbeat_extension_seconds": int,
    "max_receive_count": int,
    "lease_seconds": float,
    "send_settle_seconds": float,
    "clock_skew_seconds": float,
    "openai_timeout_seconds": float,
    "twilio_timeout_seconds": float,
    "secrets_ttl_seconds": float,
    "batch_concurrency": int,
    "compose_attempts": int,
    "final_update_attempts": int,
}
_KIND = {name: "integer" if parser is int else "number" for name, parser in _PARSERS.items()}
