"""The fault points: where a run is broken, by a crash (escapes like a Lambda timeout) or an error
(what the adapter would raise there), injected only through the fakes' scripts and the SDK seams.

A ``FaultWorld`` is one processor (the real pipeline from ``bootstrap.build``) on fakes, fed by
the event-source emulator; ``run_case`` breaks it at one point and reports what came out.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.domain import ConversationRecord, RecordKey, Status
from channel_processor.entrypoints.sqs_batch import (
    batch_item_failures,
    delivery_from_lambda_record,
    process_batch,
)
from channel_processor.errors import (
    ComposerUnavailable,
    LeaseLost,
    LookupUnavailable,
    SecretsUnavailable,
    SendOutcomeUnknown,
    SendThrottled,
    StoreUnavailable,
)
from channel_processor.observability import logger
from channel_processor.pipeline import Pipeline, apply_final_update
from channel_processor.ports import ComposeRequest
from tests.fakes.composer import FakeComposer
from tests.fakes.secrets import FakeSecretSource
from tests.fakes.sender import AcceptThenRaise, FakeSender
from tests.fakes.store import FakeConversationStore, FakeDeadLetters, FakeRepairLog
from tests.faults.emulator import Crash, EventSource, Handler, LambdaContext
from tests.faults.queue import MemoryQueue, Queue
from tests.support import (
    OPENAI_SECRET,
    OPENAI_SECRET_NAME,
    TWILIO_SECRET,
    TWILIO_SECRET_NAME,
    body,
    context_object,
)

Kind = Literal["crash", "error"]
KINDS: tuple[Kind, ...] = ("crash", "error")

# Short enough that a crashed attempt's lease ends within two redeliveries, long enough that a
# live attempt is never taken over.
FAULT_SETTINGS = Settings(
    max_receive_count=5,
    lease_seconds=0.6,
    send_settle_seconds=0.0,
    clock_skew_seconds=30.0,
    heartbeat_interval_seconds=0.05,
    heartbeat_extension_seconds=1,
    # The send's lease is max(lease, Twilio timeout): keep it within two redeliveries too.
    twilio_timeout_seconds=0.5,
    openai_timeout_seconds=2.0,
    final_update_attempts=3,
    batch_concurrency=4,
    log_level="ERROR",
)
COMPOSE_SECONDS = 0.12  # long enough for heartbeat ticks to happen during an attempt


# -- CRITICAL lines, per conversation ------------------------------------------------------------


class CriticalLines(logging.Handler):
    """Collects the processor's CRITICAL lines as the JSON the log shipper would see."""

    def __init__(self) -> None:
        super().__init__(level=logging.CRITICAL)
        self.setFormatter(logger.registered_formatter)
        self.lines: list[dict[str, Any]] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(self.format(record))
        with self._guard:
            self.lines.append(line)

    def about(self, conversation_id: str) -> list[dict[str, Any]]:
        with self._guard:
            return [x for x in self.lines if x.get("conversation_id") == conversation_id]


_critical: CriticalLines | None = None
_critical_guard = threading.Lock()


def critical_lines() -> CriticalLines:
    """The process-wide collector (installed once on the processor's logger)."""
    global _critical
    with _critical_guard:
        if _critical is None:
            _critical = CriticalLines()
            logger._logger.addHandler(_critical)
        return _critical


# -- a store whose writes can also fail after they were applied -----------------------------------


class FaultyStore(FakeConversationStore):
    """``FakeConversationStore`` plus ``after``: called once an update was applied (a write that
    committed but whose answer was lost)."""

    def __init__(self) -> None:
        super().__init__(script=None)
        self.after: Callable[[str, RecordKey | None, ConversationRecord], None] | None = None

    def update(
        self, key: RecordKey, expect: Any, changes: Mapping[str, Any], *args: Any, **kw: Any
    ) -> ConversationRecord:  # type: ignore[override]
        record = super().update(key, expect, changes, *args, **kw)
        if self.after is not None:
            self.after("update", key, record)
        return record


class ScriptedExtender:
    """The heartbeat's ``VisibilityExtender`` with a script in front (the SDK seam)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.script: Callable[[str, int], None] | None = None
        self.calls = 0

    def extend(self, receipt_handle: str, seconds: int) -> None:
        self.calls += 1
        if self.script is not None:
            self.script(receipt_handle, seconds)
        self.inner.extend(receipt_handle, seconds)


# -- the world -------------------------------------------------------------------------------------


@dataclass
class Conversation:
    request_id: str
    recipient: str
    data: dict[str, Any]

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.recipient, self.data["conversation_data"]["conversation_id"])


def conversation(n: int, tag: str = "") -> Conversation:
    """The n-th conversation: its own request id and its own valid recipient number."""
    seed = uuid.uuid5(uuid.NAMESPACE_URL, f"faults/{tag}/{n}")
    request_id = str(uuid.UUID(bytes=seed.bytes, version=4))
    recipient = f"+1202555{n % 10_000:04d}"
    return Conversation(request_id, recipient, context_object(request_id, recipient))


def pipeline_handler(pipeline: Pipeline) -> Handler:
    """``lambda_sqs.handler`` with this pipeline in place of its warm cache (the same three calls),
    so several worlds can run side by side in one process."""

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000.0 - 2.0
        deliveries = [delivery_from_lambda_record(r, deadline) for r in event["Records"]]
        results = process_batch(pipeline, deliveries, pipeline.settings.batch_concurrency)
        return batch_item_failures(deliveries, results)

    return handler


class FaultWorld:
    """One processor on fakes behind an emulated SQS event source."""

    def __init__(
        self,
        settings: Settings = FAULT_SETTINGS,
        queue: Queue | None = None,
        compose_seconds: float = COMPOSE_SECONDS,
        heartbeat: bool = True,
    ) -> None:
        self.settings = settings
        self.queue: Queue = queue or MemoryQueue(
            visibility_seconds=0.3, max_receive_count=settings.max_receive_count
        )
        self.store = FaultyStore()
        self.store.script = self._store_script
        self.repair_log = FakeRepairLog()
        self.dead_letters = FakeDeadLetters()
        self.secrets = FakeSecretSource(
            {TWILIO_SECRET_NAME: TWILIO_SECRET, OPENAI_SECRET_NAME: OPENAI_SECRET},
            script=lambda name, n: self._fire("secrets", name),
        )
        self.compose_seconds = compose_seconds
        self.composer = FakeComposer(self._compose)
        self.sender = FakeSender(script=lambda op, request: self._fire(f"sender.{op}", request))
        self.extender = ScriptedExtender(self.queue.extender())
        # hooks[op] -> callables run in order; each may raise, or return a value to use instead.
        self.hooks: dict[str, list[Callable[[Any], Any]]] = {}
        self._lock = threading.Lock()
        overrides: dict[str, Any] = {
            "store": self.store,
            "repair_log": self.repair_log,
            "dead_letters": self.dead_letters,
            "secrets": self.secrets,
            "composer": self.composer,
            "sender": self.sender,
        }
        if heartbeat:
            overrides["extender"] = self.extender
        self.pipeline = build(settings, **overrides)
        self.critical = critical_lines()

    # -- scripting --------------------------------------------------------------------------------
    def on(self, op: str, hook: Callable[[Any], Any]) -> None:
        """``op``: store.create/get/update (arg: the key), store.after_update (the record),
        secrets (the name), compose (the request), sender.template/send/find_sent, extend."""
        with self._lock:
            self.hooks.setdefault(op, []).append(hook)
        if op == "store.after_update":
            self.store.after = lambda _op, _key, record: self._fire("store.after_update", record)
        if op == "extend":
            self.extender.script = lambda handle, seconds: self._fire("extend", handle)

    def _fire(self, op: str, arg: Any) -> Any:
        with self._lock:
            hooks = list(self.hooks.get(op, ()))
        for hook in hooks:
            answer = hook(arg)
            if answer is not None:
                return answer
        return None

    def _store_script(self, op: str, key: RecordKey | None) -> None:
        self._fire(f"store.{op}", key)

    def _compose(self, request: ComposeRequest, call_number: int) -> dict[str, str]:
        self._fire("compose", request)
        time.sleep(self.compose_seconds)
        return {name: f"value {name}" for name in request.template.variables}

    def record(self, key: RecordKey) -> ConversationRecord | None:
        return self.store.peek(key)

    # -- running ----------------------------------------------------------------------------------
    def handler(self) -> Handler:
        return pipeline_handler(self.pipeline)

    def run(
        self,
        conversations: Iterable[Conversation],
        *,
        batch_size: int = 1,
        consumers: int = 1,
        max_seconds: float = 30.0,
    ) -> EventSource:
        for c in conversations:
            self.queue.send(body(c.data))
        source = EventSource(self.queue, self.handler(), batch_size=batch_size, consumers=consumers)
        source.run(max_seconds)
        return source

    def apply_repairs(self) -> int:
        """What the reconciler does with the repair log (faults over): apply each update once."""
        with self._lock:
            self.hooks.clear()
        applied = 0
        while entries := self.repair_log.receive(10):
            for entry in entries:
                apply_final_update(self.store, entry.update)
                self.repair_log.ack(entry)
                applied += 1
        return applied

    def creates(self, recipient: str) -> int:
        return self.sender.sends_to(recipient)

    def dlq_count(self, c: Conversation) -> int:
        text = body(c.data)
        return sum(1 for b in self.queue.dlq_bodies() if b == text) + sum(
            1 for letter in self.dead_letters.forwarded if letter.body == text
        )


# -- triggers ---------------------------------------------------------------------------------------


class Once:
    """Fires on the first call that matches ``when``; ``times`` widens it (0: every match)."""

    def __init__(
        self,
        action: Callable[[], Any],
        when: Callable[[Any], bool] = lambda _: True,
        times: int = 1,
    ) -> None:
        self.action, self.when, self.times = action, when, times
        self.fired = 0
        self._lock = threading.Lock()

    def __call__(self, arg: Any) -> Any:
        with self._lock:
            if not self.when(arg) or (self.times and self.fired >= self.times):
                return None
            self.fired += 1
        return self.action()


def _raise(exc: BaseException) -> Callable[[], Any]:
    def action() -> Any:
        raise exc

    return action


def _crash(where: str) -> BaseException:
    return Crash(f"simulated Lambda death {where}")


def _status_is(
    world: FaultWorld, *statuses: Status, draft: bool | None = None
) -> Callable[[Any], bool]:
    def when(key: Any) -> bool:
        record = world.store.peek(key) if key is not None else None
        if record is None or record.status not in statuses:
            return False
        return draft is None or (record.draft is not None) == draft

    return when


# -- the points -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    sends: int
    status: str
    dlq: int = 0
    critical: int = 0


SENT = Expected(1, Status.SENT.value)


@dataclass(frozen=True)
class FaultPoint:
    name: str
    where: str
    install: Callable[[FaultWorld, Kind], None]
    expected: Mapping[Kind, Expected] = field(
        default_factory=lambda: {"crash": SENT, "error": SENT}
    )

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(k for k in KINDS if k in self.expected)


def _at(
    op: str,
    error: Callable[[], BaseException],
    when: Callable[[FaultWorld], Callable[[Any], bool]] | None = None,
    times: int = 1,
) -> Callable[[FaultWorld, Kind], None]:
    def install(world: FaultWorld, kind: Kind) -> None:
        exc = _crash(op) if kind == "crash" else error()
        world.on(op, Once(_raise(exc), when(world) if when else lambda _: True, times))

    return install


def _accepted_then(error: Callable[[], BaseException]) -> Callable[[FaultWorld, Kind], None]:
    def install(world: FaultWorld, kind: Kind) -> None:
        exc = _crash("after Twilio accepted") if kind == "crash" else error()
        world.on("sender.send", Once(lambda: AcceptThenRaise(exc)))

    return install


def _lost_then(
    op: str, error: Callable[[], BaseException], times: int = 1
) -> Callable[[FaultWorld, Kind], None]:
    """Twilio accepts and the answer is lost; then ``op`` fails on the redelivery."""

    def install(world: FaultWorld, kind: Kind) -> None:
        world.on("sender.send", Once(lambda: AcceptThenRaise(SendOutcomeUnknown("read timeout"))))
        exc = _crash(op) if kind == "crash" else error()
        world.on(op, Once(_raise(exc), times=times))

    return install


def _slow_secrets(
    install: Callable[[FaultWorld, Kind], None],
) -> Callable[[FaultWorld, Kind], None]:
    """Every attempt spends a few heartbeat intervals in the secrets step (even a redelivery that
    reuses the stored draft), so a tick always happens before the check that precedes the send."""

    def slow(world: FaultWorld, kind: Kind) -> None:
        world.on("secrets", lambda _name: time.sleep(3 * world.settings.heartbeat_interval_seconds))
        install(world, kind)

    return slow


def _release_write(world: FaultWorld, kind: Kind) -> None:
    world.on("compose", Once(_raise(ComposerUnavailable("OpenAI 503"))))
    exc = _crash("release") if kind == "crash" else StoreUnavailable("ThrottlingException")
    # The write after a failed compose is the lease release: processing, no draft yet.
    world.on("store.update", Once(_raise(exc), _status_is(world, Status.PROCESSING, draft=False)))


FAULT_POINTS: tuple[FaultPoint, ...] = (
    FaultPoint(
        "claim_write",
        "before the claim: the conditional create (DynamoDB PutItem) fails or the run dies",
        _at("store.create", lambda: StoreUnavailable("ProvisionedThroughputExceededException")),
    ),
    FaultPoint(
        "secrets",
        "after the claim: fetching the secrets (Secrets Manager)",
        _at("secrets", lambda: SecretsUnavailable("ThrottlingException")),
    ),
    FaultPoint(
        "template",
        "after the secrets: fetching the template (Twilio Content API)",
        _at("sender.template", lambda: SendThrottled("Twilio 429 on the content fetch")),
    ),
    FaultPoint(
        "compose",
        "during the composer call (OpenAI)",
        _at("compose", lambda: ComposerUnavailable("OpenAI 503")),
    ),
    FaultPoint(
        "draft_write",
        "after the composer: memoising the draft (DynamoDB UpdateItem)",
        _at(
            "store.update",
            lambda: StoreUnavailable("ThrottlingException"),
            lambda w: _status_is(w, Status.PROCESSING, draft=False),
        ),
    ),
    FaultPoint(
        "sending_intent_write",
        "recording the `sending` intent (DynamoDB UpdateItem)",
        _at(
            "store.update",
            lambda: StoreUnavailable("ThrottlingException"),
            lambda w: _status_is(w, Status.PROCESSING, draft=True),
        ),
    ),
    FaultPoint(
        "after_sending_intent",
        "after the `sending` intent, before the request reaches Twilio (error: 429, nothing sent)",
        _at("sender.send", lambda: SendThrottled("Twilio 429")),
    ),
    FaultPoint(
        "send_reset_unaccepted",
        "the create request dies on the way (error: outcome unknown, Twilio never got it)",
        _at("sender.send", lambda: SendOutcomeUnknown("connection reset")),
    ),
    FaultPoint(
        "twilio_accepted_response_lost",
        "Twilio accepted the message, the answer is lost (timeout / reset / 5xx)",
        _accepted_then(lambda: SendOutcomeUnknown("503 after acceptance")),
    ),
    FaultPoint(
        "lookup_on_redelivery",
        "answer lost, then the redelivery's Twilio lookup (messages.list) fails once",
        _lost_then("sender.find_sent", lambda: LookupUnavailable("Twilio 500 on list")),
    ),
    FaultPoint(
        "final_update_write",
        "after the send, before the final update lands (DynamoDB UpdateItem)",
        _at(
            "store.update",
            lambda: StoreUnavailable("ThrottlingException"),
            lambda w: _status_is(w, Status.SENDING),
        ),
    ),
    FaultPoint(
        "final_update_answer_lost",
        "the final update committed, its answer is lost (timeout after commit)",
        _at(
            "store.after_update",
            lambda: StoreUnavailable("read timeout"),
            lambda w: lambda record: record.status is Status.SENT,
        ),
    ),
    FaultPoint(
        "final_update_down",
        "every final-update write fails: CRITICAL line + repair entry, no retry, no resend",
        _at(
            "store.update",
            lambda: StoreUnavailable("ThrottlingException"),
            lambda w: _status_is(w, Status.SENDING),
            times=0,
        ),
        {"error": Expected(1, Status.SENT.value, critical=1)},
    ),
    FaultPoint(
        "release_write",
        "a transient failure, then the lease release write fails too",
        _release_write,
    ),
    FaultPoint(
        "heartbeat_lease_lost",
        "a heartbeat tick finds the receipt handle invalid/expired: stop before the send",
        _at("extend", lambda: LeaseLost("ReceiptHandleIsInvalid")),
        {"error": SENT},
    ),
    FaultPoint(
        "heartbeat_lost_always",
        "every heartbeat tick finds the handle invalid: no send; the last receive marks the record",
        _slow_secrets(_at("extend", lambda: LeaseLost("ReceiptHandleIsInvalid"), times=0)),
        {"error": Expected(0, Status.FAILED_UNKNOWN.value, dlq=1)},
    ),
    FaultPoint(
        "heartbeat_throttled",
        "a heartbeat tick is throttled: logged, next tick retried, the run goes on",
        _at("extend", lambda: StoreUnavailable("RequestThrottled"), times=3),
        {"error": SENT},
    ),
    FaultPoint(
        "compose_down",
        "OpenAI fails on every receive: the last receive marks the record and dead-letters it",
        _at("compose", lambda: ComposerUnavailable("OpenAI 503"), times=0),
        {"error": Expected(0, Status.FAILED_TO_PROCESS_AI.value, dlq=1)},
    ),
    FaultPoint(
        "secrets_down",
        "Secrets Manager fails on every receive",
        _at("secrets", lambda: SecretsUnavailable("ThrottlingException"), times=0),
        {"error": Expected(0, Status.FAILED_SECRETS_FETCH.value, dlq=1)},
    ),
    FaultPoint(
        "lookup_down",
        "answer lost and Twilio cannot be asked on any receive: needs_reconciliation + CRITICAL",
        _lost_then("sender.find_sent", lambda: LookupUnavailable("Twilio 500 on list"), times=0),
        {"error": Expected(1, Status.NEEDS_RECONCILIATION.value, dlq=1, critical=1)},
    ),
)


# -- running the matrix ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    point: str
    kind: Kind
    sends: int
    status: str | None
    dlq: int
    critical: int
    receives: int
    crashes: int
    seconds: float
    timed_out: bool

    def outcome(self) -> Expected:
        return Expected(self.sends, self.status or "-", self.dlq, self.critical)


def run_case(
    point: FaultPoint, kind: Kind, n: int = 0, settings: Settings = FAULT_SETTINGS
) -> CaseResult:
    started = time.monotonic()
    world = FaultWorld(settings)
    point.install(world, kind)
    c = conversation(n, tag=f"{point.name}/{kind}")
    source = world.run([c], max_seconds=30.0)
    world.apply_repairs()
    record = world.record(c.key)
    return CaseResult(
        point=point.name,
        kind=kind,
        sends=world.creates(c.recipient),
        status=record.status.value if record else None,
        dlq=world.dlq_count(c),
        critical=len(world.critical.about(c.key.conversation_id)),
        receives=source.report.invocations,
        crashes=source.report.crashes,
        seconds=round(time.monotonic() - started, 2),
        timed_out=source.report.timed_out,
    )


def run_matrix(points: Iterable[FaultPoint] = FAULT_POINTS, parallel: int = 8) -> list[CaseResult]:
    cases = [(p, k) for p in points for k in p.kinds]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda pk: run_case(pk[0], pk[1], cases.index(pk)), cases))


def format_table(results: Iterable[CaseResult]) -> str:
    rows = [("fault", "kind", "sends", "final status", "DLQ", "CRITICAL", "receives", "s")]
    for r in results:
        sends = "2+" if r.sends >= 2 else str(r.sends)
        rows.append(
            (
                r.point,
                r.kind,
                sends,
                r.status or "-",
                str(r.dlq),
                str(r.critical),
                str(r.receives),
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def with_settings(**changes: Any) -> Settings:
    return replace(FAULT_SETTINGS, **changes)


__all__ = ["FAULT_POINTS", "FaultWorld", "LambdaContext", "run_case", "run_matrix"]
