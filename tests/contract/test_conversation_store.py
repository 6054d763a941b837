"""The ConversationStore contract, run against every implementation: the in-memory fake, SQLite
and DynamoDB (moto server). A store that passes here can back the pipeline."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest

from channel_processor.adapters.dynamodb_store import DynamoDBConversationStore, table_definition
from channel_processor.adapters.sqlite_store import (
    SQLITE_ERRORS,
    SQLiteConversationStore,
    translate,
)
from channel_processor.domain import (
    OPEN_STATUS_ATTR,
    STATUS_ATTR,
    ConversationRecord,
    Expect,
    RecordKey,
    Status,
    iso,
    status_change,
)
from channel_processor.errors import RecordExists, StateConflict, StoreUnavailable
from channel_processor.ports import ConversationStore
from tests.fakes.store import FakeConversationStore

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
PHONE = "+12025550123"


@pytest.fixture()
def dynamodb_store(moto_endpoint: str) -> Iterator[DynamoDBConversationStore]:
    client = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1")
    name = f"conversations-{uuid.uuid4().hex[:12]}"
    client.create_table(**table_definition(name))
    yield DynamoDBConversationStore(client, name)
    client.delete_table(TableName=name)


@pytest.fixture(params=["fake", "sqlite", "dynamodb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ConversationStore:
    if request.param == "fake":
        return FakeConversationStore()
    if request.param == "sqlite":
        return SQLiteConversationStore(tmp_path / "state" / "local.db")
    store: ConversationStore = request.getfixturevalue("dynamodb_store")
    return store


def make_item(
    conversation_id: str | None = None,
    status: Status = Status.PROCESSING,
    updated_at: datetime = T0,
    **extra: Any,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "primary_channel": PHONE,
        "conversation_id": conversation_id or f"co-1#pr-1#{uuid.uuid4()}#447700900123",
        "company_id": "co-1",
        "project_id": "pr-1",
        **status_change(status, updated_at),
        "created_at": iso(updated_at),
        "task_complete": 0,
        "lease_owner": "worker-a",
        "lease_expires_at": iso(updated_at + timedelta(minutes=2)),
    }
    item.update(extra)
    return item


def key_of(item: dict[str, Any]) -> RecordKey:
    return RecordKey(item["primary_channel"], item["conversation_id"])


PROCESSING = Expect.status(Status.PROCESSING)


# -- create ---------------------------------------------------------------------------------


def test_create_returns_the_record_and_get_reads_it_back(store: ConversationStore) -> None:
    item = make_item(company_rep={"company_rep_1": "Ana", "company_rep_2": None})

    created = store.create(item)

    assert created.attributes == item
    stored = store.get(key_of(item))
    assert stored is not None
    assert stored.attributes == item


def test_create_on_a_taken_key_raises_record_exists_carrying_the_stored_record(
    store: ConversationStore,
) -> None:
    first = make_item(attempt_count=1)
    store.create(first)
    second = {**first, "lease_owner": "worker-b", "attempt_count": 7}

    with pytest.raises(RecordExists) as raised:
        store.create(second)

    assert raised.value.existing.attributes == first
    stored = store.get(key_of(first))
    assert stored is not None and stored.lease_owner == "worker-a"


def test_create_drops_none_values_and_empty_sparse_attributes(store: ConversationStore) -> None:
    item = make_item(
        gsi_company_whatsapp_number="",
        gsi_recipient_tel=None,
        thread_id=None,
        recipient_last_name="",
    )
    item[OPEN_STATUS_ATTR] = ""

    created = store.create(item)

    stored = store.get(key_of(item))
    assert stored is not None
    for absent in ("gsi_company_whatsapp_number", "gsi_recipient_tel", "thread_id", "open_status"):
        assert absent not in stored.attributes
        assert absent not in created.attributes
    # Empty strings are only dropped where they would key an index.
    assert stored.attributes["recipient_last_name"] == ""


def test_fractional_numbers_in_nested_project_data_round_trip_as_exact_decimals(
    store: ConversationStore,
) -> None:
    project_data = {"rate": 4.5, "x": 0.1, "shift": {"hours": [7.25, 8]}, "whole": 3.0}
    item = make_item(project_data=project_data)

    created = store.create(item)

    stored = store.get(key_of(item))
    assert stored is not None
    expected = {
        "rate": Decimal("4.5"),
        "x": Decimal("0.1"),
        "shift": {"hours": [Decimal("7.25"), 8]},
        "whole": 3,
    }
    assert stored.attributes["project_data"] == expected
    assert created.attributes["project_data"] == expected
    assert isinstance(stored.attributes["project_data"]["x"], Decimal)
    assert isinstance(stored.attributes["task_complete"], int)


# -- update ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expect",
    [
        pytest.param(Expect.status(Status.SENDING), id="wrong-status"),
        pytest.param(Expect.status(Status.PROCESSING, lease_owner="worker-b"), id="wrong-lease"),
        pytest.param(
            Expect.status(Status.PROCESSING, lease_expires_at=iso(T0)), id="wrong-lease-expiry"
        ),
        pytest.param(
            Expect.status(Status.PROCESSING, send_attempt_id="attempt-2"), id="wrong-attempt"
        ),
    ],
)
def test_update_whose_expectation_fails_raises_state_conflict_and_writes_nothing(
    store: ConversationStore, expect: Expect
) -> None:
    item = make_item(send_attempt_id="attempt-1")
    store.create(item)

    with pytest.raises(StateConflict):
        store.update(
            key_of(item),
            expect,
            {**status_change(Status.SENDING, T0 + timedelta(seconds=5)), "lease_owner": None},
            append_message={"message_id": "SM1"},
            increment_attempts=True,
        )

    stored = store.get(key_of(item))
    assert stored is not None
    assert stored.attributes == item


def test_update_with_a_matching_expectation_applies_every_change(
    store: ConversationStore,
) -> None:
    item = make_item(send_attempt_id="attempt-1")
    store.create(item)
    expect = Expect.status(
        Status.PROCESSING, Status.SENDING, lease_owner="worker-a", send_attempt_id="attempt-1"
    )

    updated = store.update(
        key_of(item),
        expect,
        {**status_change(Status.SENDING, T0 + timedelta(seconds=5)), "send_started_at": iso(T0)},
    )

    assert updated.status is Status.SENDING
    assert updated.attributes["send_started_at"] == iso(T0)
    assert store.get(key_of(item)) == updated


def test_update_on_a_missing_key_raises_state_conflict_and_creates_nothing(
    store: ConversationStore,
) -> None:
    key = RecordKey(PHONE, "co-1#pr-1#missing#447700900123")

    with pytest.raises(StateConflict):
        store.update(key, PROCESSING, {"last_error": "boom"})

    assert store.get(key) is None


def test_update_with_none_removes_the_attribute(store: ConversationStore) -> None:
    item = make_item(last_error="timeout")
    store.create(item)

    updated = store.update(key_of(item), PROCESSING, {"last_error": None, "lease_owner": None})

    assert "last_error" not in updated.attributes
    assert "lease_owner" not in updated.attributes
    stored = store.get(key_of(item))
    assert stored is not None and "last_error" not in stored.attributes


def test_append_message_on_a_record_created_without_messages_starts_the_history(
    store: ConversationStore,
) -> None:
    item = make_item()
    assert "messages" not in item
    store.create(item)
    first = {"message_id": "SM1", "role": "assistant", "total_tokens": 12}
    second = {"message_id": "SM2", "role": "assistant", "total_tokens": 7}

    store.update(key_of(item), PROCESSING, {"last_error": None}, append_message=first)
    updated = store.update(key_of(item), PROCESSING, {"task_complete": 1}, append_message=second)

    assert updated.messages == [first, second]
    stored = store.get(key_of(item))
    assert stored is not None and stored.messages == [first, second]


def test_append_message_adds_to_an_existing_history(store: ConversationStore) -> None:
    earlier = {"message_id": "SM0", "role": "user", "content": "hi"}
    item = make_item(messages=[earlier])
    store.create(item)

    updated = store.update(
        key_of(item), PROCESSING, {"task_complete": 1}, append_message={"message_id": "SM1"}
    )

    assert updated.messages == [earlier, {"message_id": "SM1"}]


def test_increment_attempts_counts_from_a_missing_attribute(store: ConversationStore) -> None:
    item = make_item()
    store.create(item)

    once = store.update(key_of(item), PROCESSING, {"last_error": "a"}, increment_attempts=True)
    twice = store.update(key_of(item), PROCESSING, {"last_error": "b"}, increment_attempts=True)

    assert once.attempt_count == 1
    assert twice.attempt_count == 2
    assert twice.attributes["attempt_count"] == 2


def test_reserved_word_attribute_names_are_written_and_read_back(
    store: ConversationStore,
) -> None:
    item = make_item()
    store.create(item)
    later = T0 + timedelta(seconds=30)

    store.update(
        key_of(item),
        PROCESSING,
        {**status_change(Status.SENDING, later), "status": "x", "name": "n", "timestamp": "t"},
    )

    stored = store.get(key_of(item))
    assert stored is not None
    assert stored.attributes[STATUS_ATTR] == "sending"
    assert stored.status is Status.SENDING
    assert (stored.attributes["status"], stored.attributes["name"]) == ("x", "n")
    assert stored.attributes["timestamp"] == "t"
    assert stored.attributes["updated_at"] == iso(later)


def test_update_stores_fractions_as_decimals(store: ConversationStore) -> None:
    item = make_item()
    store.create(item)

    updated = store.update(
        key_of(item), PROCESSING, {"draft": {"variables": {"1": "Ana"}, "temperature": 0.7}}
    )

    assert updated.attributes["draft"]["temperature"] == Decimal("0.7")
    stored = store.get(key_of(item))
    assert stored is not None and stored.attributes["draft"]["temperature"] == Decimal("0.7")


# -- list_open ------------------------------------------------------------------------------


def test_find_returns_every_record_with_that_conversation_id_and_no_other(
    store: ConversationStore,
) -> None:
    wanted = make_item()
    other_recipient = make_item(wanted["conversation_id"], primary_channel="+14155552671")
    unrelated = make_item()
    for item in (wanted, other_recipient, unrelated):
        store.create(item)
    found = store.find(wanted["conversation_id"])
    assert sorted(r.primary_channel for r in found) == sorted([PHONE, "+14155552671"])
    assert store.find("no-such-conversation") == []


def test_list_open_returns_only_that_open_status_before_the_cutoff_oldest_first(
    store: ConversationStore,
) -> None:
    ten = make_item("c-ten", Status.PROCESSING, T0 + timedelta(hours=1))
    nine = make_item("c-nine", Status.PROCESSING, T0)
    sending = make_item("c-sending", Status.SENDING, T0 - timedelta(hours=1))
    sent = make_item("c-sent", Status.SENT, T0 - timedelta(hours=2))
    too_new = make_item("c-new", Status.PROCESSING, T0 + timedelta(hours=3))
    for item in (ten, nine, sending, sent, too_new):
        store.create(item)
    cutoff = T0 + timedelta(hours=2)

    processing = store.list_open(Status.PROCESSING, cutoff)
    in_sending = store.list_open(Status.SENDING, cutoff)

    assert [r.conversation_id for r in processing] == ["c-nine", "c-ten"]
    assert [r.conversation_id for r in in_sending] == ["c-sending"]
    assert store.list_open(Status.PROCESSING, cutoff, limit=1)[0].conversation_id == "c-nine"


def test_a_record_leaves_the_open_index_when_its_open_status_is_removed(
    store: ConversationStore,
) -> None:
    item = make_item("c-1", Status.PROCESSING, T0)
    store.create(item)
    cutoff = T0 + timedelta(hours=1)
    assert [r.conversation_id for r in store.list_open(Status.PROCESSING, cutoff)] == ["c-1"]

    store.update(key_of(item), PROCESSING, status_change(Status.SENT, T0 + timedelta(minutes=1)))

    assert store.list_open(Status.PROCESSING, cutoff) == []
    stored = store.get(key_of(item))
    assert stored is not None and OPEN_STATUS_ATTR not in stored.attributes


# -- concurrency ----------------------------------------------------------------------------


def skip_on_moto(store: ConversationStore) -> None:
    # moto checks a condition and writes the item without a lock, so on its server two racing
    # conditional writes can both win (seen for UpdateItem). DynamoDB itself applies a condition
    # and its write atomically; on moto the condition tests above are what can be proven.
    if isinstance(store, DynamoDBConversationStore):
        pytest.skip("moto does not serialise conditional writes; DynamoDB does")


def race(workers: int, action: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    """Run ``action(i)`` in ``workers`` threads released together; results and errors."""
    barrier = threading.Barrier(workers)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcome = action(i)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, errors


def test_ten_racing_creates_of_one_key_have_exactly_one_winner(store: ConversationStore) -> None:
    skip_on_moto(store)
    conversation_id = f"co-1#pr-1#{uuid.uuid4()}#447700900123"

    results, errors = race(
        10, lambda i: store.create(make_item(conversation_id, lease_owner=f"worker-{i}"))
    )

    assert len(results) == 1
    assert len(errors) == 9
    assert all(isinstance(e, RecordExists) for e in errors), errors
    winner: ConversationRecord = results[0]
    assert all(
        e.existing.lease_owner == winner.lease_owner for e in errors if isinstance(e, RecordExists)
    )


def test_ten_racing_conditional_updates_on_one_lease_have_exactly_one_winner(
    store: ConversationStore,
) -> None:
    skip_on_moto(store)
    item = make_item(lease_owner="expired-worker")
    store.create(item)
    takeover = Expect.status(Status.PROCESSING, lease_owner="expired-worker")

    results, errors = race(
        10,
        lambda i: store.update(
            key_of(item), takeover, {"lease_owner": f"worker-{i}"}, increment_attempts=True
        ),
    )

    assert len(results) == 1
    assert len(errors) == 9
    assert all(type(e) is StateConflict for e in errors), errors
    stored = store.get(key_of(item))
    assert stored is not None
    assert stored.lease_owner == results[0].lease_owner
    assert stored.attempt_count == 1


# -- SQLite specifics: several processes on one file, and its error table --------------------


def test_two_sqlite_stores_on_one_file_see_each_others_records_and_conflicts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shared.db"
    first, second = SQLiteConversationStore(path), SQLiteConversationStore(path)
    item = make_item()
    first.create(item)

    with pytest.raises(RecordExists):
        second.create(item)
    second.update(key_of(item), PROCESSING, {"lease_owner": "worker-b"})

    with pytest.raises(StateConflict):
        first.update(
            key_of(item),
            Expect.status(Status.PROCESSING, lease_owner="worker-a"),
            {"last_error": "late"},
        )


def test_sqlite_store_reports_a_locked_database_as_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteConversationStore(path, busy_timeout_seconds=0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match=r"SQLITE_BUSY|locked"):
            store.create(make_item())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The lock gone, the same store works again.
    assert store.create(make_item()).status is Status.PROCESSING


def test_sqlite_error_table_covers_every_sqlite3_exception_class() -> None:
    classes = [
        cls
        for cls in vars(sqlite3).values()
        if isinstance(cls, type) and issubclass(cls, sqlite3.Error)
    ]

    assert set(classes) <= set(SQLITE_ERRORS)
    for cls in classes:
        assert isinstance(translate(cls("boom")), StoreUnavailable)


def test_racing_updates_from_separate_sqlite_connections_have_exactly_one_winner(
    tmp_path: Path,
) -> None:
    # One store per thread: each its own connection, as separate processes would have.
    path = tmp_path / "shared.db"
    stores = [SQLiteConversationStore(path) for _ in range(10)]
    item = make_item(lease_owner="expired-worker")
    stores[0].create(item)
    takeover = Expect.status(Status.PROCESSING, lease_owner="expired-worker")

    results, errors = race(
        10, lambda i: stores[i].update(key_of(item), takeover, {"lease_owner": f"worker-{i}"})
    )

    assert len(results) == 1
    assert all(type(e) is StateConflict for e in errors), errors
    stored = stores[0].get(key_of(item))
    assert stored is not None and stored.lease_owner == results[0].lease_owner
