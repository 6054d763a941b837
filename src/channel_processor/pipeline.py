"""The fixed sequence of steps for one Context Object, written once for Lambda, worker and CLI.

Error policy (SPEC §5), decided by the class of the error, never by its text:
- Steps 1–2 (read, validate): ``InvalidInput`` / ``NoConsent`` are permanent. The record says why when
  the input identifies a conversation; the body goes to the dead-letter queue with its reasons; ack.
- Step 4 (claim): only ``RecordExists`` means "already there", and then the stored status decides
  (``domain.decide_claim``); a throttled write is retried, never taken for a duplicate.
- Steps 5–7 before the send: a ``PermanentError`` marks the record ``failed_*`` and acks; a
  ``RetryableError`` releases the lease and asks SQS to redeliver, except on the last receive, where
  the record is marked ``failed_*`` and the body is forwarded to the DLQ.
- Step 7: the ``sending`` intent is written before Twilio is called. Throttled (nothing sent): back to
  ``processing`` and retry. Outcome unknown (timeout, 5xx): the record stays ``sending``; the next
  delivery or the reconciler asks Twilio whether the message exists. Never a blind resend.
- Step 8: the final update is retried a few times; if it still fails, one CRITICAL JSON line
  (``final_db_update_failed``) and a repair-log entry, no raise, and the message counts as processed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from channel_processor import __version__
from channel_processor.config import Settings
from channel_processor.context import (
    ContextObject,
    dead_letter_body,
    identify,
    parse_body,
    require_consent,
    validate,
)
from channel_processor.domain import (
    RELEASE_LEASE,
    ClaimAction,
    ConversationRecord,
    Draft,
    Expect,
    Outcome,
    PendingFinalUpdate,
    RecordKey,
    SendRequest,
    SentMessage,
    Status,
    Template,
    decide_claim,
    iso,
    lease_until,
    mask_phone,
    message_entry,
    sanitise_variables,
    status_change,
)
from channel_processor.errors import (
    ComposeFailed,
    InvalidInput,
    LeaseLost,
    NoConsent,
    PermanentError,
    RecordExists,
    RetryableError,
    SendOutcomeUnknown,
    SendRejected,
    SendThrottled,
    StateConflict,
)
from channel_processor.observability import (
    STEP8_EVENT,
    InMemoryMetrics,
    Metrics,
    log_context,
    logger,
)
from channel_processor.ports import (
    Clock,
    Composer,
    ComposeRequest,
    ConversationStore,
    DeadLetters,
    RepairLog,
    SecretSource,
    Sender,
    TwilioCredentials,
    VisibilityExtender,
)
from channel_processor.secrets import parse_openai_key, parse_twilio_credentials
from channel_processor.send_check import (
    Verdict,
    check_send,
    mark_needs_reconciliation,
    ms_since_created,
    take_over_send,
)


class SystemClock:
    def now(self) -> datetime:
        from channel_processor.domain import utcnow

        return utcnow()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class Delivery:
    """One input: the raw body and what the queue said about it."""

    body: str
    message_id: str | None = None
    receipt_handle: str | None = None
    receive_count: int = 1
    deadline: float | None = None  # time.monotonic() by which the attempt must be over


@dataclass(frozen=True)
class ProcessResult:
    conversation_id: str | None
    status: str | None
    outcome: Outcome
    message_sid: str | None = None
    errors: tuple[str, ...] = ()

    @property
    def should_retry(self) -> bool:
        """True when the queue must deliver this message again (a batch item failure)."""
        return self.outcome is Outcome.RETRY

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "status": self.status,
            "outcome": self.outcome.value,
            "message_sid": self.message_sid,
            "errors": list(self.errors),
        }


@dataclass
class Dependencies:
    store: ConversationStore
    repair_log: RepairLog
    dead_letters: DeadLetters
    secrets: SecretSource
    composer: Composer
    sender: Sender
    extender: VisibilityExtender | None = None
    clock: Clock = field(default_factory=SystemClock)
    metrics: Metrics = field(default_factory=InMemoryMetrics)
    uses_openai: bool = False


# Which failed_* status a transient error becomes when the last receive gives up at that step.
_GIVE_UP_STATUS = {
    "claim": Status.FAILED_UNKNOWN,
    "secrets": Status.FAILED_SECRETS_FETCH,
    "template": Status.FAILED_TO_SEND_MESSAGE,
    "compose": Status.FAILED_TO_PROCESS_AI,
    "send": Status.FAILED_TO_SEND_MESSAGE,
}

# Time kept in hand after a send for the final update (and its retries) before the deadline.
_FINAL_UPDATE_RESERVE_SECONDS = 3.0


@dataclass
class _Attempt:
    """State of one attempt at one record; owner is this attempt's lease id."""

    context: ContextObject
    delivery: Delivery
    heartbeat: Any
    started: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    step: str = "claim"

    @property
    def key(self) -> RecordKey:
        return self.context.key


class Pipeline:
    def __init__(
        self,
        deps: Dependencies,
        settings: Settings,
        heartbeat_factory: Callable[[Delivery, dict[str, Any]], Any] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deps = deps
        self.settings = settings
        self._heartbeat_factory = heartbeat_factory
        self._monotonic = monotonic

    # -- entry ---------------------------------------------------------------------------------

    def process(self, delivery: Delivery) -> ProcessResult:
        """Run one input through every step; never raises for anything the input or a provider
        does (only ``BaseException`` such as a Lambda timeout escapes)."""
        started = self._monotonic()
        with log_context(message_id=delivery.message_id):
            result = self._process(delivery, started)
        self.deps.metrics.latency("total", (self._monotonic() - started) * 1000)
        return result

    def _process(self, delivery: Delivery, started: float) -> ProcessResult:
        data: Any = None
        try:
            data = parse_body(delivery.body)
            original = dead_letter_body(data)
            if original is not None:  # a redriven dead letter: process what was first sent
                delivery = replace(delivery, body=original)
                data = parse_body(original)
            context = validate(
                data,
                default_region=self.settings.default_phone_region,
                require_openai_key=self.deps.uses_openai,
            )
        except InvalidInput as exc:
            return self._reject(delivery, data, exc)
        with log_context(conversation_id=context.conversation_id, request_id=context.request_id):
            try:
                require_consent(context)
            except NoConsent as exc:
                return self._reject(delivery, data, exc, context=context)
            heartbeat = self._start_heartbeat(delivery, context)
            try:
                attempt = _Attempt(context, delivery, heartbeat, started)
                return self._run(attempt)
            finally:
                heartbeat.stop()

    def _start_heartbeat(self, delivery: Delivery, context: ContextObject) -> Any:
        from channel_processor.heartbeat import Heartbeat, NoHeartbeat

        keys = {"conversation_id": context.conversation_id, "message_id": delivery.message_id}
        if self._heartbeat_factory is not None:
            return self._heartbeat_factory(delivery, keys).start()
        if delivery.receipt_handle is None or self.deps.extender is None:
            return NoHeartbeat()
        return Heartbeat(
            self.deps.extender,
            delivery.receipt_handle,
            interval_seconds=self.settings.heartbeat_interval_seconds,
            extension_seconds=self.settings.heartbeat_extension_seconds,
            log_keys=keys,
        ).start()

    # -- steps 1–2: inputs that can never succeed -----------------------------------------------

    def _reject(
        self,
        delivery: Delivery,
        data: Any,
        exc: InvalidInput | NoConsent,
        context: ContextObject | None = None,
    ) -> ProcessResult:
        problems = exc.problems if isinstance(exc, InvalidInput) else [exc.reason]
        key = context.key if context else identify(data, self.settings.default_phone_region)
        status: Status | None = None
        if key is not None:
            now = self.deps.clock.now()
            item = (
                context.record_attributes()
                if context
                else {
                    "primary_channel": key.primary_channel,
                    "conversation_id": key.conversation_id,
                }
            )
            item.update(self._new_record_base(now))
            item.update(status_change(exc.status, now))
            item.update(failure_code=exc.code, failure_reason=exc.reason[:2000])
            try:
                status = self.deps.store.create(item).status
            except RecordExists as existing:
                # A real conversation already has this key: the bad copy must not overwrite it.
                status = existing.existing.status
            except RetryableError as err:
                return self._retry_result(key.conversation_id, None, f"record write failed: {err}")
        try:
            self.deps.dead_letters.forward(delivery.body, problems, delivery.message_id)
        except RetryableError as err:
            return self._retry_result(key.conversation_id if key else None, status, f"DLQ: {err}")
        self.deps.metrics.count("dlq_forwarded")
        self.deps.metrics.count("failed_permanent", code=exc.code)
        logger.warning(
            "input rejected",
            extra={"event": "input_rejected", "code": exc.code, "problems": problems},
        )
        return ProcessResult(
            key.conversation_id if key else None,
            status.value if status else None,
            Outcome.REJECTED,
            errors=tuple(problems),
        )

    # -- step 4: claim ----------------------------------------------------------------------------

    def _new_record_base(self, now: datetime) -> dict[str, Any]:
        return {
            "channel_method": "whatsapp",
            "processor_version": __version__,
            "messages": [],
            "created_at": iso(now),
            "updated_at": iso(now),
            "task_complete": 0,
            "thread_id": None,
            "attempt_count": 0,
        }

    def _run(self, attempt: _Attempt) -> ProcessResult:
        store, now = self.deps.store, self.deps.clock.now()
        item = attempt.context.record_attributes()
        item.update(self._new_record_base(now))
        item.update(status_change(Status.PROCESSING, now))
        item.update(
            lease_owner=attempt.owner,
            lease_expires_at=lease_until(now, self.settings.lease_seconds),
        )
        try:
            record = self._timed("claim", lambda: store.create(item))
        except RecordExists as exc:
            existing = exc.existing
            action = decide_claim(existing, now)
            if action is ClaimAction.DUPLICATE:
                self.deps.metrics.count("duplicate_suppressed")
                logger.info(
                    "duplicate delivery", extra={"event": "duplicate", "status": existing.status}
                )
                return ProcessResult(
                    existing.conversation_id,
                    existing.status.value,
                    Outcome.DUPLICATE,
                    message_sid=existing.attributes.get("message_sid"),
                )
            if action is ClaimAction.BUSY:
                reason = (
                    f"another attempt holds a live lease on this {existing.status.value} record"
                )
                if self._is_last_receive(attempt.delivery) and self._forward_dead(
                    attempt.delivery, [f"{reason} on the last receive; redrive once it is free"]
                ):
                    # SQS would dead-letter it anyway; this way the DLQ entry says why.
                    return ProcessResult(
                        existing.conversation_id,
                        existing.status.value,
                        Outcome.FAILED,
                        errors=(reason,),
                    )
                return self._retry_result(existing.conversation_id, existing.status, reason)
            if action is ClaimAction.VERIFY_SEND:
                return self._verify_send(attempt, existing)
            try:
                record = store.update(
                    attempt.key,
                    Expect.status(
                        Status.PROCESSING,
                        lease_owner=existing.lease_owner,
                        lease_expires_at=existing.lease_expires_at,
                    ),
                    {
                        "lease_owner": attempt.owner,
                        "lease_expires_at": lease_until(now, self.settings.lease_seconds),
                        "updated_at": iso(now),
                    },
                )
            except (StateConflict, RetryableError) as err:
                return self._retry_result(
                    attempt.context.conversation_id, None, f"take-over: {err}"
                )
        except RetryableError as err:
            self.deps.metrics.count("retried", step="claim")
            return self._retry_result(attempt.context.conversation_id, None, f"claim: {err}")
        return self._work(attempt, record)

    # -- steps 5–7 ----------------------------------------------------------------------------------

    def _work(self, attempt: _Attempt, record: ConversationRecord) -> ProcessResult:
        try:
            attempt.heartbeat.check()
            attempt.step = "secrets"
            credentials, api_key = self._timed(
                "secrets", lambda: self._credentials(attempt.context)
            )
            attempt.heartbeat.check()
            attempt.step = "template"
            template = self._timed(
                "template",
                lambda: self.deps.sender.template(credentials, credentials.template_sid),
            )
            attempt.step = "compose"
            draft = record.draft or self._timed(
                "compose", lambda: self._compose(attempt, record, template, api_key)
            )
            attempt.heartbeat.check()
            attempt.step = "send"
            self._ensure_time_to_send(attempt.delivery.deadline)
            send_attempt_id = uuid.uuid4().hex
            now = self.deps.clock.now()
            self.deps.store.update(
                attempt.key,
                Expect.status(Status.PROCESSING, lease_owner=attempt.owner),
                {
                    **status_change(Status.SENDING, now),
                    "send_attempt_id": send_attempt_id,
                    "send_started_at": iso(now),
                    # Renewed so the lease covers the Twilio call: a duplicate delivery meanwhile
                    # finds it live and backs off instead of asking Twilio mid-send.
                    "lease_expires_at": lease_until(now, self._send_lease_seconds()),
                },
            )
        except PermanentError as exc:
            return self._fail(
                attempt, exc, Expect.status(Status.PROCESSING, lease_owner=attempt.owner)
            )
        except StateConflict as exc:
            # Our lease was taken over: the other attempt owns the record now; do nothing more.
            return self._retry_result(
                attempt.context.conversation_id, None, f"lease taken over: {exc}"
            )
        except Exception as exc:  # retryable, or a defect: release and let SQS decide
            return self._release(attempt, exc)
        return self._send(attempt, credentials, template, draft, send_attempt_id)

    def _credentials(self, context: ContextObject) -> tuple[TwilioCredentials, str | None]:
        twilio_name = context.credentials_id
        credentials = parse_twilio_credentials(self.deps.secrets.get(twilio_name), twilio_name)
        api_key = None
        if self.deps.uses_openai:
            openai_name = context.openai.api_key_reference or ""
            api_key = parse_openai_key(self.deps.secrets.get(openai_name), openai_name)
        return credentials, api_key

    def _compose(
        self,
        attempt: _Attempt,
        record: ConversationRecord,
        template: Template,
        api_key: str | None,
    ) -> Draft:
        """Ask the composer, re-asking within a bound when its answer breaks the template's rules;
        the accepted draft is memoised on the record so a retry never pays for it again."""
        openai_cfg = attempt.context.openai
        feedback: str | None = None
        thread_id = record.thread_id
        for _ in range(self.settings.compose_attempts):
            draft = self.deps.composer.compose(
                ComposeRequest(
                    template=template,
                    context=attempt.context.raw,
                    api_key=api_key,
                    model=openai_cfg.model or self.settings.openai_model,
                    instructions=openai_cfg.instructions,
                    thread_id=thread_id,
                    feedback=feedback,
                    timeout_seconds=self._budget(
                        attempt.delivery.deadline, self.settings.openai_timeout_seconds
                    ),
                )
            )
            thread_id = draft.thread_id or thread_id
            cleaned, problems = sanitise_variables(draft.variables, template.variables)
            if not problems:
                accepted = replace(draft, variables=cleaned, rendered=template.render(cleaned))
                self.deps.store.update(
                    attempt.key,
                    Expect.status(Status.PROCESSING, lease_owner=attempt.owner),
                    {
                        "draft": accepted.to_item(),
                        "thread_id": accepted.thread_id,
                        "updated_at": iso(self.deps.clock.now()),
                    },
                )
                return accepted
            feedback = "; ".join(problems)
            logger.warning(
                "composer answer refused", extra={"event": "compose_refused", "problems": problems}
            )
        raise ComposeFailed(
            f"composer output broke the template's rules {self.settings.compose_attempts} times: {feedback}",
            code="invalid_output",
        )

    def _send(
        self,
        attempt: _Attempt,
        credentials: TwilioCredentials,
        template: Template,
        draft: Draft,
        send_attempt_id: str,
    ) -> ProcessResult:
        context = attempt.context
        request = SendRequest(
            to=context.recipient_tel,
            from_=context.company_number,
            content_sid=template.sid,
            variables=draft.variables,
            messaging_service_sid=credentials.messaging_service_sid,
            status_callback=self.settings.status_callback_url,
        )
        sending = Expect.status(Status.SENDING, send_attempt_id=send_attempt_id)
        try:
            sent = self._timed("send", lambda: self.deps.sender.send(credentials, request))
        except SendRejected as exc:
            return self._fail(attempt, exc, sending)
        except SendThrottled as exc:
            # Nothing left Twilio's door: back to processing so the next delivery sends it.
            return self._release(attempt, exc, expect=sending, back_to_processing=True)
        except (SendOutcomeUnknown, Exception) as exc:
            return self._outcome_unknown(attempt, exc, send_attempt_id)
        pending = pending_update(
            context.key,
            send_attempt_id,
            sent,
            draft,
            self._elapsed_ms(attempt),
            self.deps.clock.now(),
        )
        return self._finish(pending, attempt.delivery.deadline)

    # -- §4 sending: the outcome of an earlier send is not known ----------------------------------

    def _outcome_unknown(
        self, attempt: _Attempt, exc: BaseException, send_attempt_id: str
    ) -> ProcessResult:
        conversation_id = attempt.context.conversation_id
        logger.warning(
            "send outcome unknown; will verify with Twilio before any resend",
            extra={"event": "send_outcome_unknown", "error": repr(exc)},
        )
        try:
            self.deps.store.update(
                attempt.key,
                Expect.status(Status.SENDING, send_attempt_id=send_attempt_id),
                {
                    "last_error": f"send outcome unknown: {exc!r}"[:2000],
                    # The call is over: the next delivery may verify at once (settle permitting).
                    "lease_expires_at": iso(self.deps.clock.now()),
                },
            )
        except Exception as err:  # the record is already `sending`; that is what matters
            logger.warning("could not note last_error", extra={"error": repr(err)})
        if self._is_last_receive(attempt.delivery):
            return self._needs_reconciliation(
                attempt, f"send outcome unknown on the last receive: {exc!r}", send_attempt_id
            )
        self.deps.metrics.count("retried", step="send_unknown")
        return self._retry_result(conversation_id, Status.SENDING, f"send outcome unknown: {exc!r}")

    def _verify_send(self, attempt: _Attempt, record: ConversationRecord) -> ProcessResult:
        """A record left in ``sending``: finish it if Twilio has the message; send only once it is
        confirmed absent after the settle window; otherwise leave it to the reconciler."""
        context = attempt.context
        now = self.deps.clock.now()
        try:
            credentials, _ = self._credentials(context)
            check = check_send(
                self.deps.sender,
                credentials,
                record,
                context.company_number,
                now=now,
                settle_seconds=self.settings.send_settle_seconds,
                skew_seconds=self.settings.clock_skew_seconds,
            )
        except RetryableError as exc:
            if self._is_last_receive(attempt.delivery):
                return self._needs_reconciliation(
                    attempt, f"cannot verify the send: {exc}", record.send_attempt_id
                )
            return self._retry_result(context.conversation_id, record.status, f"verify: {exc}")
        except PermanentError as exc:
            return self._needs_reconciliation(
                attempt, f"cannot verify the send: {exc}", record.send_attempt_id
            )
        if check.verdict is Verdict.FOUND:
            assert check.message is not None
            pending = found_message_update(record, check.message, now)
            self.deps.metrics.count("reconciled", how="redelivery_lookup")
            return self._finish(pending, attempt.delivery.deadline)
        if check.verdict is Verdict.UNKNOWN or (
            check.verdict is Verdict.SETTLING and self._is_last_receive(attempt.delivery)
        ):
            return self._needs_reconciliation(attempt, check.reason, record.send_attempt_id)
        if check.verdict is Verdict.SETTLING:
            return self._retry_result(context.conversation_id, record.status, check.reason)
        draft = record.draft
        assert draft is not None  # ABSENT implies a draft to send
        try:
            send_attempt_id = take_over_send(
                self.deps.store,
                record,
                owner=attempt.owner,
                now=now,
                lease_seconds=self._send_lease_seconds(),
            )
            template = self.deps.sender.template(credentials, credentials.template_sid)
        except (StateConflict, RetryableError) as exc:
            return self._retry_result(context.conversation_id, record.status, f"resend: {exc}")
        except PermanentError as exc:
            return self._needs_reconciliation(
                attempt, f"cannot resend: {exc}", record.send_attempt_id
            )
        logger.info(
            "send confirmed absent after settle window; sending",
            extra={"event": "resend_after_verify"},
        )
        return self._send(attempt, credentials, template, draft, send_attempt_id)

    def _needs_reconciliation(
        self, attempt: _Attempt, reason: str, send_attempt_id: str | None
    ) -> ProcessResult:
        context = attempt.context
        status = Status.NEEDS_RECONCILIATION
        try:
            mark_needs_reconciliation(
                self.deps.store, context.key, send_attempt_id, reason, self.deps.clock.now()
            )
            self.deps.metrics.count("needs_reconciliation")
        except Exception as exc:  # left `sending`: the reconciler's next pass asks Twilio again
            status = Status.SENDING
            logger.warning("could not mark needs_reconciliation", extra={"error": repr(exc)})
        if not self._forward_dead(attempt.delivery, [reason]):
            return self._retry_result(context.conversation_id, status, reason)
        return ProcessResult(
            context.conversation_id, status.value, Outcome.FAILED, errors=(reason,)
        )

    # -- step 8 -------------------------------------------------------------------------------------

    def _finish(self, pending: PendingFinalUpdate, deadline: float | None) -> ProcessResult:
        """Step 8. The message is sent whatever happens here, so this never asks for a retry."""
        last_error: BaseException | None = None
        delay = 0.1
        for attempt_no in range(self.settings.final_update_attempts):
            try:
                record = apply_final_update(self.deps.store, pending)
                self.deps.metrics.count("sent")
                logger.info(
                    "message sent and recorded",
                    extra={"event": "sent", "message_sid": pending.message_sid},
                )
                return ProcessResult(
                    pending.conversation_id, record.status.value, Outcome.SENT, pending.message_sid
                )
            except StateConflict as exc:
                last_error = exc
                break  # the record is not in the state we left it: retrying cannot help
            except Exception as exc:
                last_error = exc
                if attempt_no + 1 < self.settings.final_update_attempts and self._has_time(
                    deadline, delay + 1
                ):
                    self.deps.clock.sleep(delay)
                    delay *= 2
        return self._final_update_failed(pending, last_error)

    def _final_update_failed(
        self, pending: PendingFinalUpdate, error: BaseException | None
    ) -> ProcessResult:
        pending = pending.with_repair_id(uuid.uuid4().hex)
        repair_error: str | None = None
        try:
            pending = pending.with_repair_id(self.deps.repair_log.put(pending))
        except Exception as exc:  # the CRITICAL line below still carries the whole update
            repair_error = repr(exc)
        self.deps.metrics.count("final_update_failed")
        logger.critical(
            "Twilio message WAS sent but the final conversation update failed; the record needs "
            "repair (the reconciler applies the pending update)",
            extra={
                "event": STEP8_EVENT,
                "conversation_id": pending.conversation_id,
                "recipient": mask_phone(pending.primary_channel),
                "message_sid": pending.message_sid,
                "repair_id": pending.repair_id,
                "repair_log_error": repair_error,
                "error": repr(error),
                "pending_update": pending.to_dict()
                | {"primary_channel": mask_phone(pending.primary_channel)},
            },
        )
        return ProcessResult(
            pending.conversation_id,
            Status.SENDING.value,
            Outcome.SENT,
            pending.message_sid,
            errors=(f"final update failed; repair entry {pending.repair_id}",),
        )

    # -- failure paths ----------------------------------------------------------------------------

    def _fail(self, attempt: _Attempt, exc: PermanentError, expect: Expect) -> ProcessResult:
        try:
            status = self._write_failure(attempt, exc.status, exc.code, exc.reason, expect)
        except Exception as err:
            # Acking now would lose the request with a record that says nothing: come back, the
            # same permanent error will be met and recorded then.
            return self._retry_result(
                attempt.context.conversation_id,
                None,
                f"{exc.reason} (the failure could not be recorded: {err!r})",
            )
        self.deps.metrics.count("failed_permanent", code=exc.code)
        logger.error(
            "permanent failure",
            extra={"event": "failed", "status": exc.status.value, "code": exc.code},
        )
        return ProcessResult(
            attempt.context.conversation_id, status, Outcome.FAILED, errors=(exc.reason,)
        )

    def _write_failure(
        self, attempt: _Attempt, status: Status, code: str, reason: str, expect: Expect
    ) -> str | None:
        """Mark the record ``failed_*``: its new status, or None when it has moved on (another
        attempt owns it: not ours to mark). A store error is raised: the caller must not ack."""
        now = self.deps.clock.now()
        try:
            record = self.deps.store.update(
                attempt.key,
                expect,
                {
                    **status_change(status, now),
                    **RELEASE_LEASE,
                    "failure_code": code,
                    "failure_reason": reason[:2000],
                    "last_error": reason[:2000],
                },
            )
            return record.status.value
        except StateConflict as err:
            logger.warning(
                "record moved on; failure not recorded here",
                extra={"error": repr(err), "status": status.value},
            )
            return None

    def _release(
        self,
        attempt: _Attempt,
        exc: BaseException,
        expect: Expect | None = None,
        back_to_processing: bool = False,
    ) -> ProcessResult:
        """A transient failure before the send: give the lease back and let SQS redeliver; on the
        last receive mark the record ``failed_*`` and forward the body to the DLQ instead."""
        expect = expect or Expect.status(Status.PROCESSING, lease_owner=attempt.owner)
        reason = f"{attempt.step}: {exc!r}"[:2000]
        # A lost lease goes through the same conditional release as any transient failure: the
        # write only lands while this attempt still owns the record, and on the last receive no
        # consumer will ever see the message again, so the record must not stay `processing`.
        lease_lost = isinstance(exc, LeaseLost)
        if self._is_last_receive(attempt.delivery):
            status = (
                Status.FAILED_UNKNOWN
                if lease_lost
                else _GIVE_UP_STATUS.get(attempt.step, Status.FAILED_UNKNOWN)
            )
            code = "gave_up_lease_lost" if lease_lost else f"gave_up_{attempt.step}"
            message = f"gave up after {attempt.delivery.receive_count} receives: {reason}"
            try:
                written = self._write_failure(attempt, status, code, message, expect)
            except Exception as err:
                # Nothing could be written: hand the message back rather than ack it; after this
                # last receive SQS's own redrive moves it to the DLQ, and the reconciler lists
                # the record as stuck.
                return self._retry_result(
                    attempt.context.conversation_id, None, f"{message} (not recorded: {err!r})"
                )
            if not self._forward_dead(attempt.delivery, [message]):
                return self._retry_result(attempt.context.conversation_id, written, message)
            self.deps.metrics.count("failed_permanent", code=code)
            return ProcessResult(
                attempt.context.conversation_id, written, Outcome.FAILED, errors=(message,)
            )
        now = self.deps.clock.now()
        changes: dict[str, Any] = {
            "lease_expires_at": iso(now),
            "last_error": reason,
            "updated_at": iso(now),
        }
        if back_to_processing:
            changes.update(status_change(Status.PROCESSING, now))
            changes.update(send_attempt_id=None, send_started_at=None)
        try:
            self.deps.store.update(attempt.key, expect, changes, increment_attempts=True)
        except Exception as err:  # the lease then simply expires
            logger.warning("could not release the lease", extra={"error": repr(err)})
        self.deps.metrics.count("retried", step=attempt.step)
        logger.warning(
            "transient failure; will retry",
            extra={"event": "retry", "step": attempt.step, "error": repr(exc)},
        )
        return self._retry_result(attempt.context.conversation_id, Status.PROCESSING, reason)

    def _forward_dead(self, delivery: Delivery, reasons: list[str]) -> bool:
        """Forward the body with its reasons; False when that failed, and then the caller must
        not ack (SQS's own redrive still moves the message after maxReceiveCount)."""
        try:
            self.deps.dead_letters.forward(delivery.body, reasons, delivery.message_id)
        except Exception as exc:
            logger.error("could not forward to the DLQ", extra={"error": repr(exc)})
            return False
        self.deps.metrics.count("dlq_forwarded")
        return True

    def _retry_result(
        self, conversation_id: str | None, status: Status | str | None, reason: str
    ) -> ProcessResult:
        value = status.value if isinstance(status, Status) else status
        return ProcessResult(conversation_id, value, Outcome.RETRY, errors=(reason,))

    # -- time -----------------------------------------------------------------------------------------

    def _is_last_receive(self, delivery: Delivery) -> bool:
        return delivery.receive_count >= self.settings.max_receive_count

    def _send_lease_seconds(self) -> float:
        """Long enough to cover the Twilio call. (A redelivery that finds the lease just ended
        before the final update asks Twilio, finds the message and finishes the record.)"""
        return max(self.settings.lease_seconds, self.settings.twilio_timeout_seconds)

    def _has_time(self, deadline: float | None, seconds: float) -> bool:
        return deadline is None or deadline - self._monotonic() > seconds

    def _budget(self, deadline: float | None, wanted: float) -> float:
        """A provider timeout that still leaves time to record the outcome before the deadline."""
        if deadline is None:
            return wanted
        left = deadline - self._monotonic() - _FINAL_UPDATE_RESERVE_SECONDS
        return max(1.0, min(wanted, left))

    def _ensure_time_to_send(self, deadline: float | None) -> None:
        # Starting a send that the Lambda timeout would cut short leaves an unknown outcome behind.
        needed = self.settings.twilio_timeout_seconds + _FINAL_UPDATE_RESERVE_SECONDS
        if not self._has_time(deadline, needed):
            raise LeaseLost("not enough time left to send and record the outcome")

    def _elapsed_ms(self, attempt: _Attempt) -> int:
        return int((self._monotonic() - attempt.started) * 1000)

    def _timed(self, step: str, call: Callable[[], Any]) -> Any:
        started = self._monotonic()
        try:
            return call()
        finally:
            self.deps.metrics.latency(step, (self._monotonic() - started) * 1000)


def pending_update(
    key: RecordKey,
    send_attempt_id: str,
    sent: SentMessage,
    draft: Draft | None,
    processing_ms: int,
    now: datetime,
) -> PendingFinalUpdate:
    """The Step 8 update for a message the provider has (sent now, or found by a lookup)."""
    content = sent.body or (draft.rendered if draft else "")
    return PendingFinalUpdate(
        primary_channel=key.primary_channel,
        conversation_id=key.conversation_id,
        send_attempt_id=send_attempt_id,
        message_sid=sent.sid,
        thread_id=draft.thread_id if draft else None,
        updated_at=iso(now),
        processing_time_ms=processing_ms,
        message=message_entry(
            sid=sent.sid, at=sent.created_at or now, content=content, draft=draft
        ),
    )


def found_message_update(
    record: ConversationRecord, message: SentMessage, now: datetime
) -> PendingFinalUpdate:
    """The final update for a message Twilio has that this attempt did not just send (found by a
    lookup): its processing time runs from the record's creation to the message's creation."""
    return pending_update(
        record.key,
        record.send_attempt_id or "",
        message,
        record.draft,
        ms_since_created(record, message.created_at or now),
        now,
    )


def apply_final_update(store: ConversationStore, pending: PendingFinalUpdate) -> ConversationRecord:
    """Write a pending final update (pipeline step 8 and the reconciler): conditional on the record
    still being in the send attempt that produced it; the message is appended exactly once."""
    return write_final_update(store, pending)[0]


def write_final_update(
    store: ConversationStore, pending: PendingFinalUpdate
) -> tuple[ConversationRecord, bool]:
    """``apply_final_update`` that also says whether this call wrote it (False: already applied),
    so the reconciler can count what it repaired. Raises ``StateConflict`` for any other state."""
    try:
        record = store.update(
            pending.key,
            Expect.status(
                Status.SENDING, Status.NEEDS_RECONCILIATION, send_attempt_id=pending.send_attempt_id
            ),
            pending.changes(),
            append_message=pending.message,
        )
        return record, True
    except StateConflict:
        current = store.get(pending.key)
        if (
            current is not None
            and current.status is Status.SENT
            and current.attributes.get("message_sid") == pending.message_sid
        ):
            return current, False  # already applied (by the reconciler or an earlier try)
        raise
