"""The in-memory queue the soak uses is held to moto SQS's semantics for what the suite relies on:
receive counts, visibility, redrive to the DLQ after maxReceiveCount, deletes and extensions."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from channel_processor.errors import LeaseLost
from tests.faults.queue import MemoryQueue, MotoQueue, Queue

VISIBILITY = 1


@pytest.fixture(params=["memory", "moto"])
def queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    if request.param == "memory":
        yield MemoryQueue(visibility_seconds=VISIBILITY, max_receive_count=2)
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        yield MotoQueue(endpoint, visibility_seconds=VISIBILITY, max_receive_count=2)


def wait_visible() -> None:
    time.sleep(VISIBILITY + 0.2)


def test_a_message_not_deleted_comes_back_counted_then_goes_to_the_dlq(queue: Queue) -> None:
    # given a message received and never deleted, when it is received until the redrive
    queue.send("hello")
    [first] = queue.receive(10)
    assert queue.receive(10) == []  # hidden while in flight
    assert queue.counts() == (0, 1)
    wait_visible()
    [second] = queue.receive(10)
    wait_visible()
    third = queue.receive(10)
    # then the counts went 1, 2, and the third receive found it moved to the DLQ
    assert (first.receive_count, second.receive_count) == (1, 2)
    assert first.message_id == second.message_id and first.receipt_handle != second.receipt_handle
    assert third == []
    assert queue.dlq_bodies() == ["hello"]
    assert queue.counts() == (0, 0)


def test_deleted_message_is_gone_and_its_handle_can_no_longer_be_extended(queue: Queue) -> None:
    queue.send("bye")
    [message] = queue.receive(10)
    queue.delete(message.receipt_handle)
    assert queue.counts() == (0, 0)
    with pytest.raises(LeaseLost):
        queue.extender().extend(message.receipt_handle, 5)


def test_extension_keeps_a_message_hidden_past_the_visibility_timeout(queue: Queue) -> None:
    queue.send("keep")
    [message] = queue.receive(10)
    queue.extender().extend(message.receipt_handle, 5)
    wait_visible()
    assert queue.receive(10) == []
    assert queue.counts() == (0, 1)
