"""The composition root: the only module that imports concrete adapters. Nothing runs at import.

``build(settings)`` picks each back end from the settings; keyword overrides replace any single
dependency (tests pass fakes this way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from channel_processor.config import Settings
from channel_processor.domain import Template
from channel_processor.errors import ConfigurationError
from channel_processor.observability import EmfMetrics, InMemoryMetrics, set_level, set_service
from channel_processor.pipeline import Dependencies, Pipeline


@dataclass(frozen=True)
class LocalConfig:
    """The embedded default's world: templates, secrets and the offline composer's mapping."""

    templates: dict[str, Template]
    secrets: dict[str, Any]
    offline_mapping: dict[str, str]

    @classmethod
    def load(cls, path: str | None) -> LocalConfig:
        try:
            if path:
                text = Path(path).read_text(encoding="utf-8")
            else:
                text = (
                    resources.files("channel_processor")
                    .joinpath("local_config.json")
                    .read_text(encoding="utf-8")
                )
            data = json.loads(text)
            templates = {
                sid: Template(sid=sid, body=t["body"], variables=tuple(t["variables"]))
                for sid, t in data.get("templates", {}).items()
            }
            return cls(templates, dict(data.get("secrets", {})), dict(data["offline_mapping"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"local config {path or '(packaged default)'}: {exc!r}"
            ) from exc


def _boto_client(service: Any, settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    # Short connect/read timeouts and the SDK's standard retry mode (3 attempts with jitter): a
    # throttled call is retried inside the SDK first, then surfaces as a retryable error of ours.
    if settings.region is None and boto3.session.Session().region_name is None:
        raise ConfigurationError(
            f"no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION) for the {service} back end"
        )
    config = Config(
        connect_timeout=3,
        read_timeout=10,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max(10, settings.batch_concurrency * 3),
    )
    return boto3.client(service, region_name=settings.region, config=config)


def build(settings: Settings, **overrides: Any) -> Pipeline:
    """A pipeline wired from ``settings``; any ``Dependencies`` field may be overridden."""
    set_level(settings.log_level)
    set_service(settings.service_name)
    local = LocalConfig.load(settings.local_config) if _needs_local(settings) else None
    clients: dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in clients:
            clients[service] = _boto_client(service, settings)
        return clients[service]

    parts: dict[str, Any] = dict(overrides)
    if "store" not in parts:
        parts["store"] = _store(settings, client)
    if "repair_log" not in parts:
        parts["repair_log"] = _repair_log(settings, client)
    if "dead_letters" not in parts:
        parts["dead_letters"] = _dead_letters(settings, client)
    if "secrets" not in parts:
        parts["secrets"] = _secrets(settings, client, local)
    if "composer" not in parts:
        parts["composer"] = _composer(settings, local)
    if "sender" not in parts:
        parts["sender"] = _sender(settings, local)
    if "extender" not in parts and settings.queue_url:
        from channel_processor.adapters.sqs import SQSVisibilityExtender

        parts["extender"] = SQSVisibilityExtender(client("sqs"), settings.queue_url)
    if "metrics" not in parts:
        parts["metrics"] = (
            EmfMetrics(namespace=settings.metrics_namespace, service=settings.service_name)
            if settings.metrics == "emf"
            else InMemoryMetrics()
        )
    parts.setdefault("uses_openai", settings.composer == "openai")
    return Pipeline(Dependencies(**parts), settings)


def _needs_local(settings: Settings) -> bool:
    return (
        settings.composer == "offline"
        or settings.sender == "sandbox"
        or settings.secrets == "local"
    )


def _store(settings: Settings, client: Any) -> Any:
    if settings.store == "sqlite":
        from channel_processor.adapters.sqlite_store import SQLiteConversationStore

        return SQLiteConversationStore(settings.sqlite_path)
    from channel_processor.adapters.dynamodb_store import DynamoDBConversationStore

    return DynamoDBConversationStore(client("dynamodb"), settings.table_name)


def _repair_log(settings: Settings, client: Any) -> Any:
    if settings.repair_queue_url:
        from channel_processor.adapters.sqs import SQSRepairLog

        return SQSRepairLog(client("sqs"), settings.repair_queue_url)
    if settings.store == "sqlite":
        from channel_processor.adapters.sqlite_store import SQLiteRepairLog

        return SQLiteRepairLog(settings.sqlite_path)
    raise ConfigurationError("CP_REPAIR_QUEUE_URL is required with the dynamodb store")


def _dead_letters(settings: Settings, client: Any) -> Any:
    if settings.dlq_url:
        from channel_processor.adapters.sqs import SQSDeadLetters

        return SQSDeadLetters(client("sqs"), settings.dlq_url)
    if settings.store == "sqlite":
        from channel_processor.adapters.sqlite_store import SQLiteDeadLetters

        return SQLiteDeadLetters(settings.sqlite_path)
    raise ConfigurationError("CP_DLQ_URL is required with the dynamodb store")


def _secrets(settings: Settings, client: Any, local: LocalConfig | None) -> Any:
    from channel_processor.secrets import CachedSecretSource

    if settings.secrets == "local":
        from channel_processor.adapters.local_secrets import LocalSecretSource

        assert local is not None
        inner: Any = LocalSecretSource(local.secrets)
    else:
        from channel_processor.adapters.secrets_manager import SecretsManagerSource

        inner = SecretsManagerSource(client("secretsmanager"))
    return CachedSecretSource(inner, settings.secrets_ttl_seconds)


def _composer(settings: Settings, local: LocalConfig | None) -> Any:
    if settings.composer == "offline":
        from channel_processor.adapters.offline_composer import OfflineComposer

        assert local is not None
        return OfflineComposer(local.offline_mapping)
    from channel_processor.adapters.openai_composer import OpenAIComposer

    return OpenAIComposer(base_url=settings.openai_base_url, default_model=settings.openai_model)


def _sender(settings: Settings, local: LocalConfig | None) -> Any:
    if settings.sender == "sandbox":
        from channel_processor.adapters.sandbox_sender import SandboxSender

        assert local is not None
        return SandboxSender(settings.sqlite_path, local.templates)
    from channel_processor.adapters.twilio_sender import TwilioSender

    return TwilioSender(
        timeout_seconds=settings.twilio_timeout_seconds, base_url=settings.twilio_base_url
    )
