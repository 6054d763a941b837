"""Logs and metrics: EMF lines CloudWatch can read, correlation keys bound per thread."""

from __future__ import annotations

import json
import threading

import pytest

from channel_processor.domain import mask_phone
from channel_processor.observability import EmfMetrics, log_context, logger


def emf_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if '"_aws"' in line]


def test_emf_flush_writes_counts_and_latencies_per_dimension_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = EmfMetrics(namespace="Test")
    metrics.count("sent")
    metrics.count("sent")
    metrics.count("failed_permanent", code="21211")
    metrics.latency("send", 120.0)
    metrics.latency("send", 80.0)
    metrics.flush()
    lines = emf_lines(capsys.readouterr().out)
    plain = next(x for x in lines if "sent" in x)
    assert plain["sent"] == [2.0] or plain["sent"] == 2.0
    by_code = next(x for x in lines if "failed_permanent" in x)
    assert by_code["code"] == "21211"
    latency = next(x for x in lines if "step_latency_ms" in x)
    assert latency["step"] == "send" and latency["step_latency_ms"] == [120.0, 80.0]
    assert all(x["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Test" for x in lines)  # type: ignore[index]


def test_flush_empties_the_recorder(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = EmfMetrics()
    metrics.count("sent")
    metrics.flush()
    capsys.readouterr()
    metrics.flush()
    assert emf_lines(capsys.readouterr().out) == []


def test_correlation_keys_are_bound_per_thread(capsys: pytest.CaptureFixture[str]) -> None:
    def work(conversation_id: str) -> None:
        with log_context(conversation_id=conversation_id):
            logger.warning("working")

    threads = [threading.Thread(target=work, args=(f"c-{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.warning("outside")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert sorted(x["conversation_id"] for x in lines if x["message"] == "working") == [
        "c-0",
        "c-1",
        "c-2",
        "c-3",
    ]
    assert "conversation_id" not in next(x for x in lines if x["message"] == "outside")


@pytest.mark.parametrize(
    ("number", "masked"),
    [("+12025550123", "+1********23"), ("whatsapp:+447911123456", "+4*********56")],
)
def test_phone_numbers_are_masked(number: str, masked: str) -> None:
    assert mask_phone(number) == masked


def test_service_name_from_the_environment_reaches_logs_and_metrics(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from channel_processor.bootstrap import build
    from channel_processor.config import Settings

    settings = Settings.from_env(
        {"POWERTOOLS_SERVICE_NAME": "wa-eu", "CP_METRICS": "emf"},
        local=True,
        sqlite_path=f"{tmp_path}/local.db",
        log_level="INFO",
    )
    pipeline = build(settings)
    try:
        logger.info("hello")
        pipeline.deps.metrics.count("sent")
        pipeline.deps.metrics.flush()
        captured = capsys.readouterr()
        assert json.loads(captured.err.splitlines()[-1])["service"] == "wa-eu"
        assert emf_lines(captured.out)[0]["service"] == "wa-eu"
    finally:
        from channel_processor.observability import SERVICE, set_service

        set_service(SERVICE)
