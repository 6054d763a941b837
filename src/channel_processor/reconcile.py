"""The reconciler: settles what the pipeline could not finish, over the same ports, so no operator ever
edits a record by hand (scheduled Lambda and ``channel-processor reconcile``).

Policy, pass by pass (SPEC §4 and §7):
1. Repair log: each pending final update is applied with the pipeline's conditional write. Applied or
   already applied: acknowledged. Transient error: left un-acknowledged, it comes back. Record in any
   other state (missing, another send attempt, another SID): CRITICAL, left un-acknowledged (after
   the repair queue's maxReceiveCount it moves to the repair DLQ, which is alarmed).
2. ``sending`` older than the settle window: ask Twilio. Found: complete the record. Confirmed absent:
   take the send over (conditional on the old send attempt, so only one taker) and send once.
   Cannot tell, or more than one candidate: ``needs_reconciliation`` + CRITICAL, never a resend.
3. ``processing`` whose lease expired more than a grace period ago: listed, not changed (no live
   message can be checked from here).
4. ``needs_reconciliation``: asked again; a message Twilio now shows completes the record, anything
   else stays for an operator (``channel-processor resolve``). Never resent automatically.
Every write is conditional, and repair entries are held invisible while applied, so two reconcilers
(or a reconciler and a redelivery) running at once do each thing once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from channel_processor.config import Settings
from channel_processor.context import normalise_phone
from channel_processor.domain import (
    RELEASE_LEASE,
    ConversationRecord,
    Expect,
    SendRequest,
    SentMessage,
    Status,
    iso,
    mask_phone,
    parse_iso,
    status_change,
)
from channel_processor.errors import (
    PermanentError,
    RetryableError,
    SendRejected,
    StateConflict,
)
from channel_processor.observability import log_context, logger
from channel_processor.pipeline import (
    Dependencies,
    found_message_update,
    write_final_update,
)
from channel_processor.ports import Clock, RepairEntry, TwilioCredentials
from channel_processor.secrets import parse_twilio_credentials
from channel_processor.send_check import (
    SendCheck,
    Verdict,
    check_send,
    lookup_since,
    mark_needs_reconciliation,
    take_over_send,
)

# A processing record whose lease ended longer ago than this has no attempt and, with the queue's
# visibility timeout below it, no live message either: a redelivery would have taken the lease.
DEFAULT_STUCK_AFTER_SECONDS = 3600.0
# Records looked at per pass and status; the next scheduled run takes the rest.
DEFAULT_BATCH_LIMIT = 100
# Repair entries drained per run at most (a bound, not a target: the queue usually holds few).
DEFAULT_MAX_REPAIRS = 1000
# Time kept in hand before the deadline: a Twilio call plus one conditional write.
_MARGIN_SECONDS = 2.0


@dataclass
class StuckRecord:
    conversation_id: str
    recipient: str  # masked
    age_seconds: int  # since the lease expired
    attempt_count: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "recipient": self.recipient,
            "age_seconds": self.age_seconds,
            "attempt_count": self.attempt_count,
            "last_error": self.last_error,
        }


@dataclass
class Summary:
    """What one run did; lists hold conversation ids (``reasons`` says why, per id)."""

    repairs_applied: list[str] = field(default_factory=list)
    repairs_already_done: list[str] = field(default_factory=list)
    repairs_failed: list[str] = field(default_factory=list)  # unexpected state: left, CRITICAL
    repairs_deferred: list[str] = field(default_factory=list)  # transient error: comes back
    sending_completed: list[str] = field(default_factory=list)
    sending_resent: list[str] = field(default_factory=list)
    sending_failed: list[str] = field(default_factory=list)  # resend rejected by Twilio
    sending_waiting: list[str] = field(default_factory=list)  # not settled yet / transient
    needs_reconciliation: list[str] = field(default_factory=list)  # new and still open
    stuck_processing: list[StuckRecord] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # a whole pass could not run
    incomplete: bool = False  # stopped at the deadline

    @property
    def needs_human(self) -> bool:
        return bool(
            self.needs_reconciliation
            or self.repairs_failed
            or self.stuck_processing
            or self.sending_failed
        )

    def as_dict(self) -> dict[str, Any]:
        lists = {
            name: list(getattr(self, name))
            for name in (
                "repairs_applied",
                "repairs_already_done",
                "repairs_failed",
                "repairs_deferred",
                "sending_completed",
                "sending_resent",
                "sending_failed",
                "sending_waiting",
                "needs_reconciliation",
            )
        }
        return {
            "counts": {name: len(ids) for name, ids in lists.items()}
            | {"stuck_processing": len(self.stuck_processing)},
            **lists,
            "stuck_processing": [s.as_dict() for s in self.stuck_processing],
            "reasons": dict(self.reasons),
            "errors": list(self.errors),
            "incomplete": self.incomplete,
            "needs_human": self.needs_human,
        }


class _OutOfTime(Exception):
    pass


class Reconciler:
    def __init__(
        self,
        deps: Dependencies,
        settings: Settings,
        clock: Clock | None = None,
        *,
        stuck_after_seconds: float = DEFAULT_STUCK_AFTER_SECONDS,
        batch_limit: int = DEFAULT_BATCH_LIMIT,
        max_repairs: int = DEFAULT_MAX_REPAIRS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deps = deps
        self.settings = settings
        self.clock = clock or deps.clock
        self.stuck_after = timedelta(seconds=stuck_after_seconds)
        self.batch_limit = batch_limit
        self.max_repairs = max_repairs
        self._monotonic = monotonic
        self._deadline: float | None = None

    def run(self, deadline: float | None = None) -> Summary:
        """One pass of each kind; ``deadline`` is a ``time.monotonic()`` value (None: no limit)."""
        self._deadline = deadline
        summary = Summary()
        try:
            self._drain_repairs(summary)
            self._settle_sending(summary)
            self._list_stuck_processing(summary)
            self._recheck_needs_reconciliation(summary)
        except _OutOfTime:
            summary.incomplete = True
            logger.warning("reconciler stopped at its deadline", extra={"event": "reconcile_cut"})
        else:
            # A gauge, written every complete run (0 included): the alarm stays on while any
            # record waits for a human, not only at the moment one is marked.
            self.deps.metrics.count(
                "needs_reconciliation_open", len(set(summary.needs_reconciliation))
            )
        logger.info(
            "reconcile done",
            extra={"event": "reconcile_done", "counts": summary.as_dict()["counts"]},
        )
        return summary

    # -- pass 1: the repair log ---------------------------------------------------------------

    def _drain_repairs(self, summary: Summary) -> None:
        seen: set[str] = set()
        while len(seen) < self.max_repairs:
            self._ensure_time(_MARGIN_SECONDS)
            try:
                entries = self.deps.repair_log.receive(max_entries=10)
            except RetryableError as exc:
                summary.errors.append(f"repair log receive: {exc}")
                return
            fresh = [e for e in entries if (e.update.repair_id or e.handle) not in seen]
            if not fresh:
                # Empty, or only entries this run already handled and left (their visibility ran
                # out): the next run takes them, so one bad entry cannot spin this loop.
                return
            for entry in fresh:
                seen.add(entry.update.repair_id or entry.handle)
                with log_context(conversation_id=entry.update.conversation_id):
                    self._repair(entry, summary)

    def _repair(self, entry: RepairEntry, summary: Summary) -> None:
        update = entry.update
        cid = update.conversation_id
        try:
            _, wrote = write_final_update(self.deps.store, update)
        except StateConflict as exc:
            current = self._get_quietly(update.key)
            state = current.status.value if current else "missing"
            summary.repairs_failed.append(cid)
            summary.reasons[cid] = f"repair entry {update.repair_id}: record is {state}"
            self.deps.metrics.count("repair_failed")
            logger.critical(
                "repair entry does not fit the record; left on the repair log for an operator",
                extra={
                    "event": "repair_conflict",
                    "conversation_id": cid,
                    "recipient": mask_phone(update.primary_channel),
                    "repair_id": update.repair_id,
                    "message_sid": update.message_sid,
                    "send_attempt_id": update.send_attempt_id,
                    "record_status": state,
                    "record_send_attempt_id": current.send_attempt_id if current else None,
                    "record_message_sid": current.attributes.get("message_sid")
                    if current
                    else None,
                    "error": str(exc),
                },
            )
            return
        except RetryableError as exc:
            summary.repairs_deferred.append(cid)
            summary.reasons[cid] = f"repair deferred: {exc}"
            logger.warning("repair deferred", extra={"event": "repair_deferred", "error": str(exc)})
            return
        if wrote:
            summary.repairs_applied.append(cid)
            self.deps.metrics.count("reconciled", how="repair_log")
            logger.info(
                "pending final update applied",
                extra={
                    "event": "repaired",
                    "repair_id": update.repair_id,
                    "message_sid": update.message_sid,
                },
            )
        else:
            summary.repairs_already_done.append(cid)
        try:
            self.deps.repair_log.ack(entry)
        except RetryableError as exc:  # it comes back and is then found already applied
            logger.warning("repair entry not acknowledged", extra={"error": str(exc)})

    # -- pass 2: sending records whose outcome was never recorded ---------------------------------

    def _settle_sending(self, summary: Summary) -> None:
        now = self.clock.now()
        settle = timedelta(seconds=self.settings.send_settle_seconds)
        try:
            records = self.deps.store.list_open(Status.SENDING, now - settle, self.batch_limit)
        except RetryableError as exc:
            summary.errors.append(f"list sending: {exc}")
            return
        for record in records:
            self._ensure_time(self.settings.twilio_timeout_seconds * 2 + _MARGIN_SECONDS)
            with log_context(conversation_id=record.conversation_id):
                self._settle_one(record, summary)

    def _settle_one(self, record: ConversationRecord, summary: Summary) -> None:
        cid = record.conversation_id
        now = self.clock.now()
        if record.lease_is_live(now):
            # A send may be in flight right now (the lease is held through the Twilio call):
            # asking Twilio now could find nothing and lead to a second send.
            summary.sending_waiting.append(cid)
            return
        try:
            credentials, company_number, check = self._check(record, now, settle=True)
        except (RetryableError, PermanentError, _RecordIncomplete) as exc:
            self._mark_needs_reconciliation(record, f"cannot verify the send: {exc}", summary)
            return
        if check.verdict is Verdict.FOUND:
            assert check.message is not None
            self._complete(record, check.message, summary.sending_completed, summary, how="lookup")
        elif check.verdict is Verdict.SETTLING:
            summary.sending_waiting.append(cid)
        elif check.verdict is Verdict.UNKNOWN:
            self._mark_needs_reconciliation(record, check.reason, summary)
        else:
            self._resend(record, credentials, company_number, summary)

    def _resend(
        self,
        record: ConversationRecord,
        credentials: TwilioCredentials,
        company_number: str,
        summary: Summary,
    ) -> None:
        """SPEC §4: confirmed absent after the settle window -> send, once. The take-over is
        conditional on the old send attempt, so of two reconcilers (or a reconciler and a
        redelivery) only one sends."""
        cid, draft = record.conversation_id, record.draft
        assert draft is not None
        try:
            template = self.deps.sender.template(credentials, credentials.template_sid)
        except PermanentError as exc:
            self._mark_needs_reconciliation(record, f"cannot resend: {exc}", summary)
            return
        except RetryableError as exc:
            summary.sending_waiting.append(cid)
            summary.reasons[cid] = f"template: {exc}"
            return
        try:
            send_attempt_id = take_over_send(
                self.deps.store,
                record,
                owner=f"reconciler-{uuid.uuid4().hex}",
                now=self.clock.now(),
                # Held through the call, as the pipeline does: a redelivery meanwhile is busy.
                lease_seconds=self.settings.twilio_timeout_seconds + _MARGIN_SECONDS,
            )
        except (StateConflict, RetryableError) as exc:
            summary.sending_waiting.append(cid)  # someone else took it, or try next run
            summary.reasons[cid] = f"resend take-over: {exc}"
            return
        logger.info(
            "send confirmed absent after the settle window; sending",
            extra={"event": "resend_after_verify", "recipient": mask_phone(record.primary_channel)},
        )
        request = SendRequest(
            to=record.primary_channel,
            from_=company_number,
            content_sid=template.sid,
            variables=draft.variables,
            messaging_service_sid=credentials.messaging_service_sid,
            status_callback=self.settings.status_callback_url,
        )
        try:
            sent = self.deps.sender.send(credentials, request)
        except SendRejected as exc:
            self._write(
                record,
                Expect.status(Status.SENDING, send_attempt_id=send_attempt_id),
                {
                    **status_change(Status.FAILED_TO_SEND_MESSAGE, self.clock.now()),
                    **RELEASE_LEASE,
                    "failure_code": exc.code,
                    "failure_reason": exc.reason[:2000],
                    "last_error": exc.reason[:2000],
                },
            )
            self.deps.metrics.count("failed_permanent", code=exc.code)
            summary.sending_failed.append(cid)
            summary.reasons[cid] = f"resend rejected: {exc}"
            return
        except Exception as exc:
            # Throttled (nothing sent), ``SendOutcomeUnknown`` or a defect: the record stays
            # ``sending`` under the new attempt and the next run asks Twilio before anything else.
            self._write(
                record,
                Expect.status(Status.SENDING, send_attempt_id=send_attempt_id),
                {
                    "last_error": f"resend: {exc!r}"[:2000],
                    "lease_expires_at": iso(self.clock.now()),
                },
            )
            summary.sending_waiting.append(cid)
            summary.reasons[cid] = f"resend outcome not known yet: {exc!r}"
            return
        resent = ConversationRecord({**record.attributes, "send_attempt_id": send_attempt_id})
        self.deps.metrics.count("sent")
        self._complete(resent, sent, summary.sending_resent, summary, how="resend")

    # -- pass 3: processing records nobody is working on ------------------------------------------

    def _list_stuck_processing(self, summary: Summary) -> None:
        now = self.clock.now()
        try:
            records = self.deps.store.list_open(
                Status.PROCESSING, now - self.stuck_after, self.batch_limit
            )
        except RetryableError as exc:
            summary.errors.append(f"list processing: {exc}")
            return
        for record in records:
            expires = record.lease_expires_at
            lease_end = (
                parse_iso(expires) if expires else parse_iso(record.attributes["updated_at"])
            )
            if now - lease_end < self.stuck_after:
                continue  # a lease still live or only recently ended: a redelivery may come
            stuck = StuckRecord(
                conversation_id=record.conversation_id,
                recipient=mask_phone(record.primary_channel),
                age_seconds=int((now - lease_end).total_seconds()),
                attempt_count=record.attempt_count,
                last_error=record.attributes.get("last_error"),
            )
            summary.stuck_processing.append(stuck)
            logger.error(
                "processing record with an expired lease and no attempt since",
                extra={"event": "stuck_processing", **stuck.as_dict()},
            )

    # -- pass 4: records waiting for an operator ----------------------------------------------------

    def _recheck_needs_reconciliation(self, summary: Summary) -> None:
        now = self.clock.now()
        settle = timedelta(seconds=self.settings.send_settle_seconds)
        try:
            records = self.deps.store.list_open(
                Status.NEEDS_RECONCILIATION, now - settle, self.batch_limit
            )
        except RetryableError as exc:
            summary.errors.append(f"list needs_reconciliation: {exc}")
            return
        for record in records:
            cid = record.conversation_id
            if cid in summary.needs_reconciliation:
                continue
            self._ensure_time(self.settings.twilio_timeout_seconds + _MARGIN_SECONDS)
            with log_context(conversation_id=cid):
                match = None
                try:
                    # Without a settle window: only a found message changes anything here.
                    _, _, check = self._check(record, now, settle=False)
                    match = check.message if check.verdict is Verdict.FOUND else None
                except (RetryableError, PermanentError, _RecordIncomplete):
                    pass  # still unknown: it stays for the operator
                if match is not None and self._complete(
                    record, match, summary.sending_completed, summary, how="lookup"
                ):
                    continue
                summary.needs_reconciliation.append(cid)
                summary.reasons.setdefault(cid, str(record.attributes.get("last_error") or ""))

    # -- shared -----------------------------------------------------------------------------------

    def _check(
        self, record: ConversationRecord, now: datetime, settle: bool
    ) -> tuple[TwilioCredentials, str, SendCheck]:
        credentials, company_number = self._credentials(record)
        check = check_send(
            self.deps.sender,
            credentials,
            record,
            company_number,
            now=now,
            settle_seconds=self.settings.send_settle_seconds if settle else 0,
            skew_seconds=self.settings.clock_skew_seconds,
        )
        return credentials, company_number, check

    def _credentials(self, record: ConversationRecord) -> tuple[TwilioCredentials, str]:
        config = record.attributes.get("channel_config") or {}
        name = config.get("whatsapp_credentials_id")
        number = record.attributes.get("gsi_company_whatsapp_number") or config.get(
            "company_whatsapp_number"
        )
        if not name or not number:
            raise _RecordIncomplete("record lacks channel_config credentials id or company number")
        try:
            company_number = normalise_phone(str(number), self.settings.default_phone_region)
        except ValueError as exc:
            raise _RecordIncomplete(f"company number is not E.164: {exc}") from exc
        return parse_twilio_credentials(self.deps.secrets.get(str(name)), str(name)), company_number

    def _complete(
        self,
        record: ConversationRecord,
        message: SentMessage,
        bucket: list[str],
        summary: Summary,
        how: str,
    ) -> bool:
        """The final update for a message Twilio has; processing time runs from the record's
        creation to the message's creation at Twilio (the request's whole wait)."""
        cid = record.conversation_id
        pending = found_message_update(record, message, self.clock.now())
        try:
            _, wrote = write_final_update(self.deps.store, pending)
        except (StateConflict, RetryableError) as exc:
            # The message exists; the record stays as it is and the next run finds it again.
            summary.sending_waiting.append(cid)
            summary.reasons[cid] = f"final update after {how}: {exc}"
            logger.warning(
                "message found but the record could not be completed yet",
                extra={
                    "event": "reconcile_deferred",
                    "message_sid": message.sid,
                    "error": str(exc),
                },
            )
            return False
        if wrote:
            bucket.append(cid)
            self.deps.metrics.count("reconciled", how=how)
            logger.info(
                "record completed from Twilio's answer",
                extra={"event": "reconciled", "how": how, "message_sid": message.sid},
            )
        return True

    def _mark_needs_reconciliation(
        self, record: ConversationRecord, reason: str, summary: Summary
    ) -> None:
        cid = record.conversation_id
        try:
            mark_needs_reconciliation(
                self.deps.store, record.key, record.send_attempt_id, reason, self.clock.now()
            )
        except StateConflict:
            summary.sending_waiting.append(cid)  # it moved on meanwhile: nothing to flag
            return
        except RetryableError as exc:
            summary.sending_waiting.append(cid)
            summary.reasons[cid] = f"could not mark needs_reconciliation: {exc}"
            return
        summary.needs_reconciliation.append(cid)
        summary.reasons[cid] = reason
        self.deps.metrics.count("needs_reconciliation")

    def _write(self, record: ConversationRecord, expect: Expect, changes: dict[str, Any]) -> None:
        try:
            self.deps.store.update(record.key, expect, changes)
        except (StateConflict, RetryableError) as exc:
            logger.warning("could not record the resend outcome", extra={"error": str(exc)})

    def _get_quietly(self, key: Any) -> ConversationRecord | None:
        try:
            return self.deps.store.get(key)
        except RetryableError:
            return None

    def _ensure_time(self, seconds: float) -> None:
        if self._deadline is not None and self._deadline - self._monotonic() < seconds:
            raise _OutOfTime()


class _RecordIncomplete(Exception):
    """The record lacks what a Twilio lookup needs (credentials id, company number)."""


# -- operator decisions on needs_reconciliation (``channel-processor resolve``) ---------------------


def find_needs_reconciliation(
    deps: Dependencies, conversation_id: str, now: datetime, limit: int = 1000
) -> ConversationRecord | None:
    """The ``needs_reconciliation`` record with this id, read through the open-status index (the
    only records ``resolve`` may change, and the read the operator policy allows)."""
    for record in deps.store.list_open(
        Status.NEEDS_RECONCILIATION, now + timedelta(seconds=1), limit
    ):
        if record.conversation_id == conversation_id:
            return record
    return None


def resolve_sent(
    deps: Dependencies, settings: Settings, record: ConversationRecord, sid: str
) -> ConversationRecord:
    """An operator found message ``sid`` at Twilio: write the final update, conditional on the record
    still being ``needs_reconciliation`` in the same send attempt. Twilio is asked for the message's
    time and text when it can be; otherwise now and the drafted text are recorded."""
    now = deps.clock.now()
    message = SentMessage(sid=sid, status="operator_confirmed")
    try:
        credentials, company_number = Reconciler(deps, settings)._credentials(record)
        since = lookup_since(record, settings.clock_skew_seconds)
        for found in deps.sender.find_sent(
            credentials, record.primary_channel, company_number, since
        ):
            if found.sid == sid:
                message = found
    except (RetryableError, PermanentError, _RecordIncomplete) as exc:
        logger.warning(
            "resolve: Twilio not asked for the message details", extra={"error": str(exc)}
        )
    pending = found_message_update(record, message, now)
    written = deps.store.update(
        record.key,
        Expect.status(Status.NEEDS_RECONCILIATION, send_attempt_id=record.send_attempt_id),
        pending.changes(),
        append_message=pending.message,
    )
    deps.metrics.count("reconciled", how="operator")
    logger.info("operator resolved: sent", extra={"event": "resolved", "message_sid": sid})
    return written


def resolve_not_sent(
    deps: Dependencies, record: ConversationRecord, reason: str | None = None
) -> ConversationRecord:
    """An operator confirmed no message reached Twilio: close the record as
    ``failed_to_send_message``, conditional on it still being ``needs_reconciliation``."""
    text = reason or "operator confirmed at Twilio that no message was sent"
    written = deps.store.update(
        record.key,
        Expect.status(Status.NEEDS_RECONCILIATION, send_attempt_id=record.send_attempt_id),
        {
            **status_change(Status.FAILED_TO_SEND_MESSAGE, deps.clock.now()),
            **RELEASE_LEASE,
            "failure_code": "operator_confirmed_not_sent",
            "failure_reason": text[:2000],
        },
    )
    deps.metrics.count("failed_permanent", code="operator_confirmed_not_sent")
    logger.info("operator resolved: not sent", extra={"event": "resolved_not_sent"})
    return written
