"""The visibility heartbeat, and a batch's bounded concurrency with one heartbeat per record."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from channel_processor.config import Settings
from channel_processor.domain import Outcome
from channel_processor.entrypoints.sqs_batch import process_batch
from channel_processor.errors import LeaseLost, StoreUnavailable
from channel_processor.heartbeat import SQS_MAX_VISIBILITY_SECONDS, Heartbeat
from channel_processor.pipeline import Delivery
from tests.fakes.composer import FakeComposer
from tests.fakes.store import FakeVisibilityExtender
from tests.support import World, body, context_object


def wait_for(condition: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqs-heartbeat"]


def test_heartbeat_extends_its_own_handle_every_interval_then_stops() -> None:
    extender = FakeVisibilityExtender()
    beat = Heartbeat(extender, "rh-1", interval_seconds=0.02, extension_seconds=30).start()
    wait_for(lambda: len(extender.calls) >= 3)
    beat.stop()
    count = len(extender.calls)
    time.sleep(0.06)
    assert len(extender.calls) == count
    assert set(extender.calls) == {("rh-1", 30)}
    assert not beat.lease_lost and heartbeat_threads() == []


def test_invalid_handle_marks_the_lease_lost_and_ends_the_thread_quietly() -> None:
    def expired(handle: str, seconds: int) -> None:
        raise LeaseLost("ReceiptHandleIsInvalid")

    extender = FakeVisibilityExtender(expired)
    beat = Heartbeat(extender, "rh-1", interval_seconds=0.01, extension_seconds=30).start()
    wait_for(lambda: beat.lease_lost)
    with pytest.raises(LeaseLost):
        beat.check()
    beat.stop()
    assert len(extender.calls) == 1 and heartbeat_threads() == []


def test_a_throttled_tick_is_retried_next_interval() -> None:
    def throttled_once(handle: str, seconds: int) -> None:
        if len(extender.calls) == 1:
            raise StoreUnavailable("ThrottlingException")

    extender = FakeVisibilityExtender(throttled_once)
    beat = Heartbeat(extender, "rh-1", interval_seconds=0.01, extension_seconds=30).start()
    wait_for(lambda: beat.ticks >= 2)
    beat.stop()
    assert not beat.lease_lost


def test_never_asks_past_the_twelve_hour_cap() -> None:
    clock = {"now": 0.0}
    extender = FakeVisibilityExtender()
    beat = Heartbeat(
        extender,
        "rh-1",
        interval_seconds=0.01,
        extension_seconds=600,
        received_at=0.0,
        monotonic=lambda: clock["now"],
    )
    clock["now"] = SQS_MAX_VISIBILITY_SECONDS - 100
    assert beat._tick() is True
    assert extender.calls[-1] == ("rh-1", 100)
    clock["now"] = SQS_MAX_VISIBILITY_SECONDS
    assert beat._tick() is False
    assert len(extender.calls) == 1


def test_pipeline_stops_and_joins_the_heartbeat_on_every_path() -> None:
    extender = FakeVisibilityExtender()
    world = World()
    world.settings = Settings(
        store="sqlite",
        composer="offline",
        sender="sandbox",
        secrets="local",
        heartbeat_interval_seconds=0.01,
        heartbeat_extension_seconds=30,
    )

    def slow(request: Any, n: int) -> dict[str, str]:
        time.sleep(0.05)  # long enough for a few ticks
        return {"1": "Amara", "2": "Jo", "3": "Northwind"}

    world.composer = FakeComposer(slow)
    pipeline = world.pipeline(extender=extender)
    sent = pipeline.process(Delivery(body=body(context_object()), receipt_handle="rh-ok"))
    rejected = pipeline.process(Delivery(body="{bad", receipt_handle="rh-bad"))
    assert sent.outcome is Outcome.SENT and rejected.outcome is Outcome.REJECTED
    assert extender.calls and {h for h, _ in extender.calls} == {"rh-ok"}
    assert heartbeat_threads() == []


def test_lease_lost_mid_attempt_stops_before_the_send() -> None:
    world = World()
    world.settings = Settings(
        store="sqlite",
        composer="offline",
        sender="sandbox",
        secrets="local",
        heartbeat_interval_seconds=0.01,
        heartbeat_extension_seconds=30,
    )

    def gone(handle: str, seconds: int) -> None:
        raise LeaseLost("message deleted by another consumer")

    def slow(request: Any, n: int) -> dict[str, str]:
        time.sleep(0.1)
        return {"1": "Amara", "2": "Jo", "3": "Northwind"}

    world.composer = FakeComposer(slow)
    pipeline = world.pipeline(extender=FakeVisibilityExtender(gone))
    result = pipeline.process(Delivery(body=body(context_object()), receipt_handle="rh"))
    assert result.outcome is Outcome.RETRY and world.sender.sent == []
    assert heartbeat_threads() == []


def test_batch_records_run_concurrently_within_the_bound() -> None:
    lock = threading.Lock()
    running = {"now": 0, "max": 0}

    def tracked(request: Any, n: int) -> dict[str, str]:
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        time.sleep(0.05)
        with lock:
            running["now"] -= 1
        return {"1": "Amara", "2": "Jo", "3": "Northwind"}

    world = World(composer=FakeComposer(tracked))
    deliveries = [
        Delivery(
            body=body(context_object(request_id=f"00000000-0000-4000-8000-{n:012d}")),
            message_id=f"m-{n}",
        )
        for n in range(8)
    ]
    results = process_batch(world.pipeline(), deliveries, concurrency=3)
    assert [r.outcome for r in results] == [Outcome.SENT] * 8
    assert 1 < running["max"] <= 3
