"""The RepairLog contract over every implementation (fake, SQLite, SQS on moto): entries survive
until acknowledged, and a received entry is hidden from other receivers for a while."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from channel_processor.adapters.sqlite_store import SQLiteRepairLog
from channel_processor.adapters.sqs import SQSRepairLog
from channel_processor.domain import PendingFinalUpdate
from channel_processor.ports import RepairEntry, RepairLog
from tests.fakes.store import FakeRepairLog

VISIBILITY = 1  # seconds: SQS's smallest useful value, so the tests stay quick
MakeLog = Callable[[], RepairLog]


def sqs_queue(endpoint: str) -> tuple[Any, str]:
    client = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    url = client.create_queue(QueueName=f"repair-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    return client, url


@pytest.fixture(params=["fake", "sqlite", "sqs"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> MakeLog:
    """Builds receivers that share one log (as two reconcilers would)."""
    if request.param == "fake":
        shared = FakeRepairLog(visibility_seconds=VISIBILITY)
        return lambda: shared
    if request.param == "sqlite":
        path = tmp_path / "repair" / "local.db"
        return lambda: SQLiteRepairLog(path, visibility_seconds=VISIBILITY)
    client, url = sqs_queue(request.getfixturevalue("moto_endpoint"))
    return lambda: SQSRepairLog(client, url, visibility_timeout=VISIBILITY)


def pending(n: int = 1) -> PendingFinalUpdate:
    return PendingFinalUpdate(
        primary_channel="+12025550123",
        conversation_id=f"co-1#pr-1#req-{n}#447700900123",
        send_attempt_id=f"attempt-{n}",
        message_sid=f"SM{n:032d}",
        thread_id="conv_abc",
        updated_at="2025-03-01T09:00:05.123Z",
        processing_time_ms=1834,
        message={
            "message_id": f"SM{n:032d}",
            "timestamp": "2025-03-01T09:00:05.123Z",
            "role": "assistant",
            "content": "Hi Ana, your shift at Acme starts Monday.",
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
        },
    )


def receive_all(log: RepairLog, attempts: int = 5) -> list[RepairEntry]:
    entries: list[RepairEntry] = []
    for _ in range(attempts):
        entries.extend(log.receive())
    return entries


def test_put_then_receive_returns_the_same_update_with_its_repair_id(make_log: MakeLog) -> None:
    log = make_log()
    update = pending()

    repair_id = log.put(update)
    entries = log.receive()

    assert repair_id
    assert [e.update for e in entries] == [update.with_repair_id(repair_id)]
    assert entries[0].handle


def test_an_unacknowledged_entry_comes_back_after_the_visibility_period(
    make_log: MakeLog,
) -> None:
    log = make_log()
    repair_id = log.put(pending())
    assert [e.update.repair_id for e in log.receive()] == [repair_id]

    hidden = log.receive()
    time.sleep(VISIBILITY + 0.5)
    again = log.receive()

    assert hidden == []
    assert [e.update.repair_id for e in again] == [repair_id]


def test_an_acknowledged_entry_never_comes_back(make_log: MakeLog) -> None:
    log = make_log()
    log.put(pending())
    (entry,) = log.receive()

    log.ack(entry)
    log.ack(entry)  # idempotent
    time.sleep(VISIBILITY + 0.5)

    assert receive_all(log) == []


def test_two_receivers_do_not_both_get_one_entry_within_the_visibility_period(
    make_log: MakeLog,
) -> None:
    first, second = make_log(), make_log()
    first.put(pending())
    barrier = threading.Barrier(2)
    received: list[list[RepairEntry]] = []

    def take(log: RepairLog) -> None:
        barrier.wait()
        received.append(log.receive())

    threads = [threading.Thread(target=take, args=(log,)) for log in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(len(entries) for entries in received) == [0, 1]


def test_every_put_entry_is_received_once_until_acknowledged(make_log: MakeLog) -> None:
    log = make_log()
    ids = {log.put(pending(n)) for n in range(1, 4)}

    first_batch = log.receive(max_entries=2)
    rest = receive_all(log)

    assert len(first_batch) <= 2
    received = [e.update.repair_id for e in [*first_batch, *rest]]
    assert sorted(received) == sorted(ids)
    assert len(ids) == 3


def test_sqs_repair_log_leaves_an_unreadable_message_on_the_queue(
    moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, url = sqs_queue(moto_endpoint)
    log = SQSRepairLog(client, url, visibility_timeout=VISIBILITY)
    client.send_message(QueueUrl=url, MessageBody=json.dumps({"not": "an update"}))
    repair_id = log.put(pending())

    entries = receive_all(log)

    assert [e.update.repair_id for e in entries] == [repair_id]
    assert "unreadable repair-queue message" in caplog.text
