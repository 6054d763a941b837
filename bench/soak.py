"""Soak: many conversations through the emulated SQS event source with random faults on about one
external call in ten, then the faults stop, the reconciler runs and dead letters of still-open
records are redriven once; prints duplicates / lost / left-open figures.

    python -m bench.soak --conversations 1000 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.sender import AcceptThenRaise
from tests.faults.emulator import Crash
from tests.faults.points import Conversation, FaultWorld, conversation, with_settings
from tests.faults.queue import MemoryQueue
from tests.support import body

from channel_processor.domain import FAILED_STATUSES, Status
from channel_processor.errors import (
    ComposerUnavailable,
    LeaseLost,
    LookupUnavailable,
    SecretsUnavailable,
    SendOutcomeUnknown,
    SendThrottled,
    StoreUnavailable,
)

# Lease shorter than the redelivery spacing, so a crashed attempt never exhausts the receives on
# BUSY; more receives than the matrix so a run of bad luck rarely reaches the DLQ.
SOAK_SETTINGS = with_settings(max_receive_count=6, lease_seconds=0.5, log_level="CRITICAL")
VISIBILITY_SECONDS = 0.6

# What an external call can do wrong, by hook: (error factory, weight); Crash is added to each.
_ERRORS: dict[str, list[Any]] = {
    "store.create": [lambda: StoreUnavailable("ProvisionedThroughputExceededException")],
    "store.update": [lambda: StoreUnavailable("ThrottlingException")],
    "store.after_update": [lambda: StoreUnavailable("read timeout after commit")],
    "secrets": [lambda: SecretsUnavailable("ThrottlingException")],
    "compose": [lambda: ComposerUnavailable("OpenAI 503")],
    "sender.template": [lambda: SendThrottled("429 on content fetch")],
    "sender.send": [
        lambda: SendThrottled("429"),
        lambda: SendOutcomeUnknown("connection reset before acceptance"),
        lambda: AcceptThenRaise(SendOutcomeUnknown("503 after acceptance")),
        lambda: AcceptThenRaise(Crash("died after Twilio accepted")),
    ],
    "sender.find_sent": [lambda: LookupUnavailable("Twilio 500 on list")],
    "extend": [lambda: LeaseLost("ReceiptHandleIsInvalid"), lambda: StoreUnavailable("throttled")],
}
# A heartbeat tick runs in its own thread: a crash there is not a process death, so only errors.
_NO_CRASH = {"extend"}


class RandomFaults:
    """One seeded coin per external call: ``rate`` of them fail, half crashing, half erring."""

    def __init__(self, seed: int, rate: float) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rate = rate
        self.enabled = True
        self.injected: Counter[str] = Counter()

    def hook(self, op: str) -> Any:
        def maybe_fail(_arg: Any) -> Any:
            if not self.enabled:
                return None
            with self._lock:
                if self._rng.random() >= self.rate:
                    return None
                crash = op not in _NO_CRASH and self._rng.random() < 0.5
                make = self._rng.choice(_ERRORS[op])
                accepted = self._rng.random() < 0.5
            if crash:
                self.injected[f"{op}:crash"] += 1
                if op == "sender.send" and accepted:
                    return AcceptThenRaise(Crash("died after Twilio accepted"))
                raise Crash(f"simulated death at {op}")
            failure = make()
            self.injected[f"{op}:{type(failure).__name__}"] += 1
            if isinstance(failure, AcceptThenRaise):
                return failure
            raise failure

        return maybe_fail


@dataclass
class SoakFigures:
    conversations: int
    seed: int
    duplicates: int = 0
    lost: int = 0
    left_open: int = 0
    open_after_faults: int = 0
    redriven: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    invocations: int = 0
    crashes: int = 0
    faults: int = 0
    seconds: float = 0.0
    reconciler: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [
            f"conversations           {self.conversations} (seed {self.seed})",
            f"duplicates              {self.duplicates}",
            f"lost                    {self.lost}",
            f"left open (processing/sending) {self.left_open}",
            f"faults injected         {self.faults} ({self.crashes} invocations crashed)",
            f"invocations             {self.invocations}",
            f"open when faults ended  {self.open_after_faults} (redriven from the DLQ: {self.redriven})",
            f"reconciler              {self.reconciler}",
            "final statuses          "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
            f"seconds                 {self.seconds:.1f}",
        ]


def run_soak(
    conversations: int = 1000,
    seed: int = 7,
    rate: float = 0.1,
    batch_size: int = 1,
    consumers: int = 8,
    max_seconds: float = 600.0,
) -> SoakFigures:
    started = time.monotonic()
    queue = MemoryQueue(
        visibility_seconds=VISIBILITY_SECONDS, max_receive_count=SOAK_SETTINGS.max_receive_count
    )
    world = FaultWorld(SOAK_SETTINGS, queue=queue, compose_seconds=0.0)
    faults = RandomFaults(seed, rate)
    for op in _ERRORS:
        world.on(op, faults.hook(op))
    convs = [conversation(n, tag=f"soak/{seed}") for n in range(conversations)]
    # Phase 1: faults on until the queue is empty.
    source = world.run(convs, batch_size=batch_size, consumers=consumers, max_seconds=max_seconds)
    figures = SoakFigures(conversations, seed)
    figures.invocations, figures.crashes = source.report.invocations, source.report.crashes
    figures.faults = sum(faults.injected.values())
    # Phase 2: the outage is over; what an operator's tools do (reconciler, then a DLQ redrive of
    # messages whose record is still open), until nothing changes.
    faults.enabled = False
    figures.open_after_faults = len(_open(world, convs))
    reconciled = _reconcile(world)
    # Open, or never claimed at all (every claim crashed): its message is only in the DLQ.
    still_open = {c.key for c in _open(world, convs)}
    dead = [
        c
        for c in convs
        if (c.key in still_open or world.record(c.key) is None) and _in_dlq(world, c)
    ]
    if dead:
        figures.redriven = len(dead)
        _redrive(world, dead, batch_size, consumers)
        _reconcile(world, reconciled)
    figures.reconciler = {name: len(ids) for name, ids in sorted(reconciled.items())}
    _judge(world, convs, figures)
    figures.seconds = time.monotonic() - started
    return figures


def _open(world: FaultWorld, convs: list[Conversation]) -> list[Conversation]:
    out = []
    for c in convs:
        record = world.record(c.key)
        if record is not None and record.status in (Status.PROCESSING, Status.SENDING):
            out.append(c)
    return out


def _in_dlq(world: FaultWorld, c: Conversation) -> bool:
    return world.dlq_count(c) > 0


def _reconcile(world: FaultWorld, seen: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Run the reconciler until a pass changes nothing (leases of crashed sends expire first);
    returns the distinct conversation ids per outcome, merged into ``seen`` (a record listed by
    several passes or runs counts once)."""
    from channel_processor.reconcile import Reconciler

    seen = {} if seen is None else seen
    time.sleep(SOAK_SETTINGS.lease_seconds)  # leases of crashed attempts end
    for _ in range(5):
        result = Reconciler(world.pipeline.deps, world.settings).run().as_dict()
        for name in result["counts"]:
            ids = (
                result[name]
                if name != "stuck_processing"
                else [s["conversation_id"] for s in result[name]]
            )
            if ids:
                seen.setdefault(name, set()).update(ids)
        if not any(
            result["counts"][k] for k in ("repairs_applied", "sending_completed", "sending_resent")
        ):
            break
    return seen


def _redrive(world: FaultWorld, dead: list[Conversation], batch_size: int, consumers: int) -> None:
    wanted = {body(c.data) for c in dead}
    remaining = [b for b in world.queue.dlq_bodies() if b in wanted]
    # The pipeline's own dead letters (last receive) and the redrive policy's both hold the body.
    remaining += [x.body for x in world.dead_letters.forwarded if x.body in wanted]
    for text in dict.fromkeys(remaining):
        world.queue.send(text)
    from tests.faults.emulator import EventSource

    EventSource(world.queue, world.handler(), batch_size=batch_size, consumers=consumers).run(120)


def _judge(world: FaultWorld, convs: list[Conversation], figures: SoakFigures) -> None:
    for c in convs:
        record = world.record(c.key)
        status = record.status if record else None
        sends = world.creates(c.recipient)
        figures.statuses[status.value if status else "no record"] += 1
        if sends > 1:
            figures.duplicates += 1
        if status in (Status.PROCESSING, Status.SENDING):
            figures.left_open += 1
        sent_once = status is Status.SENT and sends == 1
        given_up = (status in FAILED_STATUSES or status is Status.NEEDS_RECONCILIATION) and _in_dlq(
            world, c
        )
        if not (sent_once or given_up):
            figures.lost += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=0.1, help="share of external calls that fail")
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="a crash loses the whole batch, as in Lambda"
    )
    args = parser.parse_args(argv)
    # The processor's own log lines (CRITICAL ones included) are not the report.
    with contextlib.redirect_stderr(io.StringIO()):
        figures = run_soak(
            args.conversations,
            args.seed,
            args.rate,
            batch_size=args.batch_size,
            consumers=args.consumers,
        )
    print("\n".join(figures.lines()))
    return 0 if figures.duplicates == figures.lost == figures.left_open == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
