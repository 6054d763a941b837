"""The reconciler on fakes and on the SQLite store: repairs applied once, ``sending`` records settled
by Twilio's answer (found -> completed, absent -> sent once, unknown -> needs_reconciliation), stuck
records listed, concurrent runs doing each thing once."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from channel_processor.adapters.sqlite_store import SQLiteConversationStore, SQLiteRepairLog
from channel_processor.context import validate
from channel_processor.domain import (
    Draft,
    Expect,
    PendingFinalUpdate,
    RecordKey,
    SentMessage,
    Status,
    iso,
    mask_phone,
    message_entry,
    status_change,
    utcnow,
)
from channel_processor.errors import (
    ComposerUnavailable,
    LookupUnavailable,
    SendOutcomeUnknown,
    SendRejected,
    StateConflict,
    StoreUnavailable,
)
from channel_processor.observability import InMemoryMetrics
from channel_processor.pipeline import Dependencies
from channel_processor.reconcile import Reconciler, resolve_not_sent, resolve_sent
from tests.fakes.sender import AcceptThenRaise, FakeSender
from tests.fakes.store import FakeDeadLetters, FakeRepairLog
from tests.support import RECIPIENT, World, context_object

CID = context_object()["conversation_data"]["conversation_id"]
KEY = RecordKey(RECIPIENT, CID)


class FixedClock:
    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def now(self) -> datetime:
        return self.moment

    def sleep(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


def lookups_fail(op: str, request: Any) -> Any:
    if op == "find_sent":
        raise LookupUnavailable("Twilio unreachable")
    return None


def composer_down(request: Any, call_number: int) -> Any:
    raise ComposerUnavailable("503")


def critical_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "CRITICAL"]


def reconciler(world: World, later: timedelta = timedelta(minutes=5), **kwargs: Any) -> Reconciler:
    """A reconciler over the world's fakes whose clock is ``later`` than now (past any lease)."""
    deps = world.pipeline().deps
    deps.metrics = InMemoryMetrics()
    return Reconciler(deps, world.settings, FixedClock(utcnow() + later), **kwargs)


def fail_final_update(world: World) -> None:
    def script(op: str, key: RecordKey | None) -> None:
        record = world.store.peek(key) if key else None
        if op == "update" and record is not None and record.status is Status.SENDING:
            raise StoreUnavailable("ProvisionedThroughputExceededException")

    world.store.script = script


def sending_record_after_unknown_outcome(world: World, accepted: bool) -> None:
    """The pipeline left the record ``sending``: Twilio's answer was lost (``accepted``: the
    message exists at Twilio)."""

    def send_unknown(op: str, request: Any) -> Any:
        if op == "send":
            error = SendOutcomeUnknown("read timeout after the request left")
            if accepted:
                return AcceptThenRaise(error)
            raise error
        return None

    world.sender.script = send_unknown
    world.process(context_object())
    world.sender.script = None
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.SENDING


# -- pass 1: the repair log ---------------------------------------------------------------------


def test_given_a_failed_final_update_when_reconciled_then_the_record_is_sent_with_its_message() -> (
    None
):
    # Given a message sent whose final update failed (repair entry written, record still sending)
    world = World()
    fail_final_update(world)
    result = world.process(context_object())
    world.store.script = None
    [pending] = world.repair_log.pending
    sends_before = len(world.sender.sent)

    # When the reconciler runs
    rec = reconciler(world)
    summary = rec.run()

    # Then the pending update is applied: status, message in history, processing time, thread id
    assert summary.repairs_applied == [CID] and not summary.needs_human
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.SENT
    [message] = record.messages
    assert message["message_id"] == result.message_sid == pending.message_sid
    assert record.attributes["initial_processing_time_ms"] == pending.processing_time_ms
    assert record.attributes["thread_id"] == pending.thread_id and pending.thread_id
    assert "open_status" not in record.attributes and "lease_owner" not in record.attributes
    assert world.repair_log.pending == []
    assert isinstance(rec.deps.metrics, InMemoryMetrics)
    assert rec.deps.metrics.counts["reconciled[how=repair_log]"] == 1
    # and nothing was sent or looked up from reconciling
    assert len(world.sender.sent) == sends_before


def test_given_a_reconciled_repair_when_run_again_then_nothing_changes() -> None:
    world = World()
    fail_final_update(world)
    world.process(context_object())
    world.store.script = None
    reconciler(world).run()
    before = world.store.peek(KEY)

    second = reconciler(world).run()

    assert second.as_dict()["counts"] == dict.fromkeys(second.as_dict()["counts"], 0)
    assert world.store.peek(KEY) == before


def test_given_a_repair_entry_already_applied_when_reconciled_then_it_is_acked_as_done() -> None:
    # Given the update landed (e.g. the write succeeded but its answer was lost) and the entry stays
    world = World()
    fail_final_update(world)
    world.process(context_object())
    world.store.script = None
    [pending] = world.repair_log.pending
    from channel_processor.pipeline import apply_final_update

    apply_final_update(world.store, pending)

    summary = reconciler(world).run()

    assert summary.repairs_already_done == [CID] and summary.repairs_applied == []
    assert world.repair_log.pending == [] and len(world.store.peek(KEY).messages) == 1  # type: ignore[union-attr]


def test_given_a_transient_store_error_when_reconciled_then_the_entry_stays_and_applies_later() -> (
    None
):
    world = World(repair_log=FakeRepairLog(visibility_seconds=0.0))  # un-acked: back at once
    fail_final_update(world)  # still failing while the reconciler runs
    world.process(context_object())

    first = reconciler(world).run()
    assert first.repairs_deferred == [CID] and len(world.repair_log.pending) == 1

    world.store.script = None
    second = reconciler(world).run()
    assert second.repairs_applied == [CID] and world.repair_log.pending == []
    assert len(world.store.peek(KEY).messages) == 1  # type: ignore[union-attr]


def test_given_a_record_in_an_unexpected_state_when_reconciled_then_critical_and_not_acked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a repair entry whose record has since been marked failed by someone else
    world = World()
    fail_final_update(world)
    result = world.process(context_object())
    world.store.script = None
    world.store.update(
        KEY, Expect.status(Status.SENDING), status_change(Status.FAILED_UNKNOWN, utcnow())
    )
    capsys.readouterr()

    summary = reconciler(world).run()

    # Then it is reported, left on the log, and the record is untouched
    assert summary.repairs_failed == [CID] and summary.needs_human
    assert len(world.repair_log.pending) == 1
    assert world.store.peek(KEY).status is Status.FAILED_UNKNOWN  # type: ignore[union-attr]
    [line] = [x for x in critical_lines(capsys.readouterr().err) if x["event"] == "repair_conflict"]
    assert line["record_status"] == "failed_unknown" and line["message_sid"] == result.message_sid
    assert RECIPIENT not in json.dumps(line)


# -- pass 2: sending records --------------------------------------------------------------------


def test_given_a_sending_record_whose_message_exists_when_reconciled_then_completed_with_its_sid() -> (
    None
):
    world = World()
    sending_record_after_unknown_outcome(world, accepted=True)
    [accepted] = world.sender.sent

    rec = reconciler(world)
    summary = rec.run()

    assert summary.sending_completed == [CID]
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.SENT
    assert [m["message_id"] for m in record.messages] == [accepted.message.sid]
    assert record.attributes["message_sid"] == accepted.message.sid
    created = datetime.fromisoformat(record.attributes["created_at"].replace("Z", "+00:00"))
    expected_ms = int((accepted.message.created_at - created).total_seconds() * 1000)  # type: ignore[operator]
    assert abs(record.attributes["initial_processing_time_ms"] - expected_ms) <= 1
    assert record.attributes["thread_id"] == record.draft.thread_id  # type: ignore[union-attr]
    assert world.sender.sends_to(RECIPIENT) == 1  # found, never sent again
    assert rec.deps.metrics.counts["reconciled[how=lookup]"] == 1  # type: ignore[attr-defined]


def test_given_a_sending_record_absent_at_twilio_after_the_settle_window_then_sent_once() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=False)
    assert world.sender.sends_to(RECIPIENT) == 0

    summary = reconciler(world).run()

    assert summary.sending_resent == [CID]
    assert world.sender.sends_to(RECIPIENT) == 1
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.SENT
    assert [m["message_id"] for m in record.messages] == [world.sender.sent[0].message.sid]
    assert reconciler(world).run().sending_resent == [] and world.sender.sends_to(RECIPIENT) == 1


def test_given_a_sending_record_inside_the_settle_window_then_nothing_is_asked_or_sent() -> None:
    world = World()
    world.settings = replace(world.settings, send_settle_seconds=120.0)
    sending_record_after_unknown_outcome(world, accepted=False)
    calls_before = len(world.sender.calls)

    summary = reconciler(world, later=timedelta(seconds=30)).run()

    assert summary.sending_resent == [] and summary.sending_completed == []
    assert len(world.sender.calls) == calls_before and world.sender.sends_to(RECIPIENT) == 0
    assert world.store.peek(KEY).status is Status.SENDING  # type: ignore[union-attr]


def test_given_a_sending_record_under_a_live_lease_then_it_is_left_alone() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=False)
    world.store.update(
        KEY,
        Expect.status(Status.SENDING),
        {"lease_owner": "in-flight", "lease_expires_at": iso(utcnow() + timedelta(hours=1))},
    )

    summary = reconciler(world).run()

    assert summary.sending_waiting == [CID] and world.sender.sends_to(RECIPIENT) == 0


def test_given_twilio_unreachable_when_reconciled_then_needs_reconciliation_and_critical(
    capsys: pytest.CaptureFixture[str],
) -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=True)

    def lookup_down(op: str, request: Any) -> Any:
        if op == "find_sent":
            raise LookupUnavailable("Twilio unreachable")
        return None

    world.sender.script = lookup_down
    capsys.readouterr()
    rec = reconciler(world)
    summary = rec.run()

    assert summary.needs_reconciliation == [CID] and summary.needs_human
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.NEEDS_RECONCILIATION
    assert record.attributes["open_status"] == "needs_reconciliation"
    assert "Twilio unreachable" in record.attributes["last_error"]
    assert world.sender.sends_to(RECIPIENT) == 1  # the original only
    [line] = critical_lines(capsys.readouterr().err)
    assert line["event"] == "needs_reconciliation" and line["conversation_id"] == CID
    assert line["recipient"] == mask_phone(RECIPIENT)
    assert rec.deps.metrics.counts["needs_reconciliation"] == 1  # type: ignore[attr-defined]
    # and the gauge the alarm watches says one record waits; it stays so on the next run
    assert rec.deps.metrics.counts["needs_reconciliation_open"] == 1  # type: ignore[attr-defined]
    again = reconciler(world, later=timedelta(minutes=10))
    again.run()
    assert again.deps.metrics.counts["needs_reconciliation_open"] == 1  # type: ignore[attr-defined]


def test_given_two_candidate_messages_none_matching_then_needs_reconciliation_not_a_send() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=False)
    others = [SentMessage(sid=f"SM{n}", status="sent", body=f"other text {n}") for n in range(2)]
    world.sender.script = lambda op, request: others if op == "find_sent" else None

    summary = reconciler(world).run()

    assert summary.needs_reconciliation == [CID] and world.sender.sends_to(RECIPIENT) == 0


def test_given_a_resend_rejected_by_twilio_then_the_record_fails_with_the_code() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=False)

    def reject(op: str, request: Any) -> Any:
        if op == "send":
            raise SendRejected("recipient opted out", code="21610")
        return None

    world.sender.script = reject
    summary = reconciler(world).run()

    assert summary.sending_failed == [CID]
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.FAILED_TO_SEND_MESSAGE
    assert record.attributes["failure_code"] == "21610"


def test_given_two_reconcilers_on_one_absent_send_then_only_one_sends() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=False)
    barrier = threading.Barrier(2)

    def slow_lookup(op: str, request: Any) -> Any:
        if op == "find_sent":
            barrier.wait(timeout=5)  # both have asked Twilio and found nothing before either acts
            return []
        return None

    world.sender.script = slow_lookup
    summaries: list[Any] = []
    threads = [
        threading.Thread(target=lambda: summaries.append(reconciler(world).run())) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert world.sender.sends_to(RECIPIENT) == 1
    assert sorted(len(s.sending_resent) for s in summaries) == [0, 1]
    assert world.store.peek(KEY).status is Status.SENT  # type: ignore[union-attr]


# -- pass 3 and 4 ---------------------------------------------------------------------------------


def test_given_processing_with_a_long_expired_lease_then_listed_and_not_changed() -> None:
    world = World()
    world.composer.script = composer_down
    world.process(context_object())
    before = world.store.peek(KEY)
    assert before is not None and before.status is Status.PROCESSING

    recent = reconciler(world, later=timedelta(minutes=5)).run()
    summary = reconciler(world, later=timedelta(hours=2)).run()

    assert recent.stuck_processing == []
    [stuck] = summary.stuck_processing
    assert stuck.conversation_id == CID and stuck.attempt_count == 1
    assert stuck.age_seconds >= 7000 and "503" in (stuck.last_error or "")
    assert stuck.recipient == mask_phone(RECIPIENT) and summary.needs_human
    assert world.store.peek(KEY) == before


def test_given_needs_reconciliation_and_the_message_later_visible_then_completed() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=True)
    world.sender.script = lookups_fail
    reconciler(world).run()
    assert world.store.peek(KEY).status is Status.NEEDS_RECONCILIATION  # type: ignore[union-attr]

    world.sender.script = None
    summary = reconciler(world, later=timedelta(minutes=10)).run()

    assert summary.sending_completed == [CID] and summary.needs_reconciliation == []
    assert world.store.peek(KEY).status is Status.SENT  # type: ignore[union-attr]
    assert world.sender.sends_to(RECIPIENT) == 1


def test_given_needs_reconciliation_and_no_message_then_it_stays_and_is_never_resent() -> None:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=False)
    world.sender.script = lookups_fail
    reconciler(world).run()
    world.sender.script = None

    summary = reconciler(world, later=timedelta(minutes=10)).run()

    assert summary.needs_reconciliation == [CID] and summary.needs_human
    assert world.sender.sends_to(RECIPIENT) == 0
    assert world.store.peek(KEY).status is Status.NEEDS_RECONCILIATION  # type: ignore[union-attr]


def test_given_a_deadline_already_past_then_nothing_is_done_and_the_run_is_incomplete() -> None:
    world = World()
    fail_final_update(world)
    world.process(context_object())
    world.store.script = None

    summary = reconciler(world, monotonic=lambda: 100.0).run(deadline=100.5)

    assert summary.incomplete and summary.repairs_applied == []
    assert len(world.repair_log.pending) == 1


# -- operator resolution ----------------------------------------------------------------------------


def needs_reconciliation_world() -> World:
    world = World()
    sending_record_after_unknown_outcome(world, accepted=True)
    world.sender.script = lookups_fail
    reconciler(world).run()
    world.sender.script = None
    return world


def test_given_an_operator_found_the_sid_when_resolved_sent_then_the_record_is_completed() -> None:
    world = needs_reconciliation_world()
    [accepted] = world.sender.sent
    deps = world.pipeline().deps
    record = world.store.peek(KEY)
    assert record is not None

    written = resolve_sent(deps, world.settings, record, accepted.message.sid)

    assert written.status is Status.SENT
    assert [m["message_id"] for m in written.messages] == [accepted.message.sid]
    assert written.messages[0]["content"] == accepted.message.body


def test_given_a_record_not_in_needs_reconciliation_then_resolve_refuses_to_write() -> None:
    world = World()
    world.process(context_object())
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.SENT
    deps = world.pipeline().deps

    with pytest.raises(StateConflict):
        resolve_not_sent(deps, record)
    with pytest.raises(StateConflict):
        resolve_sent(deps, world.settings, record, "SM" + "0" * 32)
    assert world.store.peek(KEY) == record


def test_given_an_operator_confirmed_nothing_was_sent_then_the_record_fails_with_that_reason() -> (
    None
):
    world = needs_reconciliation_world()
    record = world.store.peek(KEY)
    assert record is not None

    written = resolve_not_sent(world.pipeline().deps, record, "checked Twilio console")

    assert written.status is Status.FAILED_TO_SEND_MESSAGE
    assert written.attributes["failure_code"] == "operator_confirmed_not_sent"
    assert "open_status" not in written.attributes


# -- two reconcilers at once on the SQLite store ---------------------------------------------------


def seed_repairs(store: Any, repair_log: Any, count: int) -> list[RecordKey]:
    """``count`` records left ``sending`` by a failed final update, each with its repair entry."""
    now = utcnow()
    keys = []
    draft = Draft(variables={"1": "Ada"}, rendered="Hi Ada", thread_id="conv_1", total_tokens=3)
    for n in range(count):
        data = context_object(request_id=f"00000000-0000-4000-8000-{n:012d}")
        item = validate(data).record_attributes() | {
            "conversation_status": "sending",
            "open_status": "sending",
            "created_at": iso(now - timedelta(seconds=2)),
            "updated_at": iso(now),
            "messages": [],
            "send_attempt_id": f"s-{n}",
            "send_started_at": iso(now),
            "draft": draft.to_item(),
        }
        record = store.create(item)
        keys.append(record.key)
        sid = f"SM{n:032d}"
        repair_log.put(
            PendingFinalUpdate(
                primary_channel=record.primary_channel,
                conversation_id=record.conversation_id,
                send_attempt_id=f"s-{n}",
                message_sid=sid,
                thread_id="conv_1",
                updated_at=iso(now),
                processing_time_ms=2000 + n,
                message=message_entry(sid=sid, at=now, content="Hi Ada", draft=draft),
            )
        )
    return keys


def sqlite_deps(path: Path, sender: FakeSender) -> Dependencies:
    world = World()
    return Dependencies(
        store=SQLiteConversationStore(path),
        repair_log=SQLiteRepairLog(path),
        dead_letters=FakeDeadLetters(),
        secrets=world.secrets,
        composer=world.composer,
        sender=sender,
        metrics=InMemoryMetrics(),
    )


def run_two_reconcilers_at_once(
    path: Path, sender: FakeSender, visibility_seconds: float
) -> list[Any]:
    """Two reconcilers on one SQLite file started together; their summaries. The records are
    fresh, inside the settle window: these runs are about the repair log alone."""
    settings = replace(World().settings, send_settle_seconds=60.0)
    barrier = threading.Barrier(2)
    summaries: list[Any] = []

    def run() -> None:
        deps = sqlite_deps(path, sender)
        deps.repair_log = SQLiteRepairLog(path, visibility_seconds=visibility_seconds)
        rec = Reconciler(deps, settings)
        barrier.wait(timeout=5)
        summaries.append(rec.run())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return summaries


def test_given_two_reconcilers_at_once_over_50_repair_entries_on_sqlite_then_each_applied_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "local.db"
    sender = FakeSender()
    keys = seed_repairs(SQLiteConversationStore(path), SQLiteRepairLog(path), 50)
    summaries = run_two_reconcilers_at_once(path, sender, visibility_seconds=30.0)

    applied = [cid for s in summaries for cid in s.repairs_applied]
    assert len(summaries) == 2 and len(applied) == 50 and len(set(applied)) == 50
    store = SQLiteConversationStore(path)
    for n, key in enumerate(keys):
        record = store.get(key)
        assert record is not None and record.status is Status.SENT
        assert [m["message_id"] for m in record.messages] == [f"SM{n:032d}"]
        assert record.attributes["initial_processing_time_ms"] == 2000 + n
    # even entries held invisible by a receive would show an hour from now: none is left
    assert SQLiteRepairLog(path, now=lambda: time.time() + 3600).receive(10) == []
    assert sender.calls == [] and sender.sent == []  # repairs never ask or send


def test_two_reconcilers_that_both_receive_every_entry_still_apply_each_once(
    tmp_path: Path,
) -> None:
    # given a repair log that hides nothing (visibility 0): both runs get every entry, so only the
    # conditional final update stands between them and a double append
    path = tmp_path / "local.db"
    sender = FakeSender()
    keys = seed_repairs(SQLiteConversationStore(path), SQLiteRepairLog(path), 50)
    summaries = run_two_reconcilers_at_once(path, sender, visibility_seconds=0)

    # then every entry was dealt with by both, applied by exactly one, appended exactly once
    applied = [cid for s in summaries for cid in s.repairs_applied]
    done = [cid for s in summaries for cid in s.repairs_already_done]
    assert len(summaries) == 2 and len(set(applied)) == len(applied) == 50
    assert len(applied) + len(done) >= 50
    store = SQLiteConversationStore(path)
    for n, key in enumerate(keys):
        record = store.get(key)
        assert record is not None and record.status is Status.SENT
        assert [m["message_id"] for m in record.messages] == [f"SM{n:032d}"]


# -- the CLI on the embedded default (SQLite store, sandbox sender) ---------------------------------


class FinalUpdateFails:
    """The SQLite store, except that the final update (status -> sent) is throttled."""

    def __init__(self, inner: SQLiteConversationStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update(self, key: RecordKey, expect: Expect, changes: Any, **kwargs: Any) -> Any:
        if changes.get("conversation_status") == Status.SENT.value:
            raise StoreUnavailable("ProvisionedThroughputExceededException")
        return self.inner.update(key, expect, changes, **kwargs)


class AnswerLost:
    """The sandbox sender, except that the answer to a send is lost (``accepted``: after the
    message was recorded, as when Twilio accepted it)."""

    def __init__(self, inner: Any, accepted: bool) -> None:
        self.inner, self.accepted = inner, accepted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, credentials: Any, request: Any) -> Any:
        if self.accepted:
            self.inner.send(credentials, request)
        raise SendOutcomeUnknown("read timeout after the request left")


@pytest.fixture()
def local_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "local.db"
    monkeypatch.setenv("CP_SQLITE_PATH", str(path))
    monkeypatch.setenv("CP_SEND_SETTLE_SECONDS", "0")
    return path


def local_key() -> RecordKey:
    return RecordKey(RECIPIENT, CID)


def cli(*argv: str) -> tuple[int, str, str]:
    import io

    from channel_processor.entrypoints.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def local_pipeline(**overrides: Any) -> Any:
    from channel_processor.bootstrap import build
    from channel_processor.config import Settings

    return build(Settings.from_env(local=True), **overrides)


def sandbox_messages(path: Path) -> list[Any]:
    from channel_processor.adapters.sandbox_sender import SandboxSender
    from channel_processor.bootstrap import LocalConfig

    return SandboxSender(path, LocalConfig.load(None).templates).messages()


def test_cli_given_a_local_final_update_failure_when_reconcile_then_sent_and_second_run_is_a_no_op(
    local_db: Path,
) -> None:
    # Given a message sent locally whose final update failed
    from channel_processor.pipeline import Delivery

    pipeline = local_pipeline(store=FinalUpdateFails(SQLiteConversationStore(local_db)))
    result = pipeline.process(Delivery(body=json.dumps(context_object()), message_id="m-1"))
    # (a peek that leaves the entry visible)
    [pending] = [e.update for e in SQLiteRepairLog(local_db, visibility_seconds=0).receive(10)]

    # When `channel-processor reconcile` runs
    code, out, _ = cli("reconcile")

    # Then the record is sent with its message and the right processing time
    assert code == 0 and "nothing needs a human" in out
    record = SQLiteConversationStore(local_db).get(local_key())
    assert record is not None and record.status is Status.SENT
    assert [m["message_id"] for m in record.messages] == [result.message_sid]
    assert record.attributes["initial_processing_time_ms"] == pending.processing_time_ms
    assert len(sandbox_messages(local_db)) == 1

    # and a second run changes nothing
    code, out, _ = cli("reconcile", "--json")
    summary = json.loads(out)
    assert code == 0 and set(summary["counts"].values()) == {0}
    assert SQLiteConversationStore(local_db).get(local_key()) == record


def local_sending_record(local_db: Path, accepted: bool) -> None:
    from channel_processor.adapters.sandbox_sender import SandboxSender
    from channel_processor.bootstrap import LocalConfig
    from channel_processor.pipeline import Delivery

    sandbox = SandboxSender(local_db, LocalConfig.load(None).templates)
    pipeline = local_pipeline(sender=AnswerLost(sandbox, accepted))
    pipeline.process(Delivery(body=json.dumps(context_object()), message_id="m-1"))
    record = SQLiteConversationStore(local_db).get(local_key())
    assert record is not None and record.status is Status.SENDING


def test_cli_given_a_local_sending_record_whose_message_exists_then_completed_with_that_sid(
    local_db: Path,
) -> None:
    local_sending_record(local_db, accepted=True)
    [message] = sandbox_messages(local_db)

    code, out, _ = cli("reconcile", "--json")

    assert code == 0 and json.loads(out)["sending_completed"] == [CID]
    record = SQLiteConversationStore(local_db).get(local_key())
    assert record is not None and record.status is Status.SENT
    assert [m["message_id"] for m in record.messages] == [message.sid]
    assert len(sandbox_messages(local_db)) == 1


def test_cli_given_a_local_sending_record_absent_after_the_settle_window_then_sent_once(
    local_db: Path,
) -> None:
    local_sending_record(local_db, accepted=False)
    assert sandbox_messages(local_db) == []

    code, out, _ = cli("reconcile", "--json")
    again, _, _ = cli("reconcile", "--json")

    assert code == 0 and again == 0 and json.loads(out)["sending_resent"] == [CID]
    [message] = sandbox_messages(local_db)
    record = SQLiteConversationStore(local_db).get(local_key())
    assert record is not None and record.status is Status.SENT
    assert [m["message_id"] for m in record.messages] == [message.sid]


def test_cli_given_a_stuck_processing_record_then_listed_and_exit_code_says_a_human_is_needed(
    local_db: Path,
) -> None:
    store = SQLiteConversationStore(local_db)
    old = utcnow() - timedelta(hours=3)
    store.create(
        validate(context_object()).record_attributes()
        | {
            "conversation_status": "processing",
            "open_status": "processing",
            "created_at": iso(old),
            "updated_at": iso(old),
            "lease_owner": "crashed-attempt",
            "lease_expires_at": iso(old + timedelta(minutes=2)),
            "attempt_count": 2,
            "last_error": "compose: ComposerUnavailable('503')",
        }
    )

    code, out, _ = cli("reconcile")

    assert code == 1 and "1  processing records stuck" in out
    assert CID in out and "attempts=2" in out and RECIPIENT not in out
    assert store.get(local_key()).status is Status.PROCESSING  # type: ignore[union-attr]


def test_cli_resolve_closes_only_a_needs_reconciliation_record(local_db: Path) -> None:
    local_sending_record(local_db, accepted=True)
    store = SQLiteConversationStore(local_db)
    record = store.get(local_key())
    assert record is not None
    store.update(
        local_key(),
        Expect.status(Status.SENDING),
        status_change(Status.NEEDS_RECONCILIATION, utcnow() - timedelta(seconds=1)),
    )
    [message] = sandbox_messages(local_db)

    code, out, _ = cli("resolve", CID, "--sent", message.sid)
    again, _, err = cli("resolve", CID, "--not-sent")

    assert code == 0 and "initial_message_sent" in out
    assert again == 1 and "no needs_reconciliation record" in err
    written = store.get(local_key())
    assert written is not None and written.status is Status.SENT
    assert [m["message_id"] for m in written.messages] == [message.sid]


def test_cli_dlq_show_lists_local_dead_letters_with_masked_numbers(local_db: Path) -> None:
    from channel_processor.adapters.sqlite_store import SQLiteDeadLetters

    SQLiteDeadLetters(local_db).forward(
        json.dumps(context_object()), ["gave up after 5 receives: claim"], "m-7"
    )

    code, out, _ = cli("dlq", "show", "--json")
    text_code, text, _ = cli("dlq", "show")

    [letter] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and text_code == 0
    assert letter["reasons"] == ["gave up after 5 receives: claim"]
    assert letter["source_message_id"] == "m-7" and letter["conversation_id"] == CID
    assert letter["recipient"] == mask_phone(RECIPIENT)
    assert RECIPIENT not in out and RECIPIENT not in text and "1 dead letter(s)" in text


def test_cli_dlq_redrive_reruns_local_dead_letters_and_removes_the_done_ones(
    local_db: Path,
) -> None:
    from channel_processor.adapters.sqlite_store import SQLiteDeadLetters

    letters = SQLiteDeadLetters(local_db)
    letters.forward(json.dumps(context_object()), ["claim: throttled"], "m-1")

    code, out, _ = cli("dlq", "redrive")

    assert code == 0 and "sent 1" in out
    assert letters.list() == [] and len(sandbox_messages(local_db)) == 1
    record = SQLiteConversationStore(local_db).get(local_key())
    assert record is not None and record.status is Status.SENT
