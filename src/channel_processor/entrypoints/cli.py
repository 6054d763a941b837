"""``channel-processor``: run Context Objects locally, inspect records, run the SQS worker, and the
operations commands (reconcile, resolve, dlq show|redrive).

``process``, ``show``, ``reconcile``, ``resolve`` and ``dlq`` use the embedded default (SQLite, offline
composer, sandbox sender) unless ``--aws`` or the CP_* environment says otherwise; ``worker`` uses the
AWS back ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.domain import Outcome, iso, mask_phone
from channel_processor.errors import ConfigurationError, ProcessorError, StateConflict
from channel_processor.pipeline import Delivery, ProcessResult

EXIT_OK = 0
EXIT_FAILED = 1  # an input failed or was rejected
EXIT_USAGE = 2
EXIT_RETRY = 75  # EX_TEMPFAIL: only transient failures; running again may succeed

# One-off commands keep their metrics in memory: EMF lines on stdout would mix with the output an
# operator pipes into jq, and outside Lambda nothing ships them. (The worker keeps EMF.)
_CLI_METRICS = "memory"


def _inputs(paths: Sequence[str], stdin: TextIO) -> Iterator[tuple[str, str]]:
    """(label, body) per Context Object: each file is one object; ``-`` is JSON lines on stdin."""
    for path in paths:
        if path == "-":
            for number, line in enumerate(stdin, start=1):
                if line.strip():
                    yield f"stdin:{number}", line
        else:
            yield path, Path(path).read_text(encoding="utf-8")


class _Progress:
    """A one-line bar on stderr, only when stderr is a terminal and there is more than one input."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.done = total, stream, 0
        self.enabled = total > 1 and stream.isatty()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total}")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def cmd_process(args: argparse.Namespace, stdout: TextIO, stderr: TextIO, stdin: TextIO) -> int:
    pipeline = build(Settings.from_env(local=True, metrics=_CLI_METRICS))
    try:
        inputs = list(_inputs(args.files, stdin))
    except OSError as exc:
        stderr.write(f"error: cannot read input: {exc}\n")
        return EXIT_USAGE
    progress = _Progress(len(inputs), stderr)
    counts: Counter[str] = Counter()
    for label, body in inputs:
        result = pipeline.process(Delivery(body=body, message_id=label))
        counts[result.outcome.value] += 1
        progress.step()
        if args.json:
            stdout.write(json.dumps(result.as_dict(), default=_json_default) + "\n")
        else:
            stdout.write(_summary_line(label, result) + "\n")
    if not args.json:
        stdout.write(
            "total: " + ", ".join(f"{o.value} {counts.get(o.value, 0)}" for o in Outcome) + "\n"
        )
    stdout.flush()
    if counts[Outcome.FAILED.value] or counts[Outcome.REJECTED.value]:
        return EXIT_FAILED
    return EXIT_RETRY if counts[Outcome.RETRY.value] else EXIT_OK


def _summary_line(label: str, result: ProcessResult) -> str:
    parts = [f"{result.outcome.value:<9}", label]
    if result.conversation_id:
        parts.append(f"conversation={result.conversation_id}")
    if result.status:
        parts.append(f"status={result.status}")
    if result.message_sid:
        parts.append(f"sid={result.message_sid}")
    line = "  ".join(parts)
    for error in result.errors:
        line += f"\n          - {error}"
    return line


def cmd_show(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    pipeline = build(Settings.from_env(local=not args.aws, metrics=_CLI_METRICS))
    records = pipeline.deps.store.find(args.conversation_id)
    if not records:
        stderr.write(f"no record with conversation_id {args.conversation_id!r}\n")
        return EXIT_FAILED
    for record in records:
        if args.json:
            stdout.write(
                json.dumps(record.attributes, default=_json_default, sort_keys=True) + "\n"
            )
            continue
        attrs = record.attributes
        stdout.write(f"conversation {record.conversation_id}\n")
        for name in (
            "conversation_status",
            "primary_channel",
            "company_name",
            "project_name",
            "created_at",
            "updated_at",
            "attempt_count",
            "thread_id",
            "message_sid",
            "initial_processing_time_ms",
            "failure_code",
            "failure_reason",
            "last_error",
        ):
            if attrs.get(name) not in (None, ""):
                stdout.write(f"  {name:<27}{attrs[name]}\n")
        stdout.write(f"  history ({len(record.messages)} message(s))\n")
        for message in record.messages:
            stdout.write(
                f"    {message.get('timestamp')}  {message.get('role')}  {message.get('message_id')}\n"
                f"      {message.get('content')}\n"
            )
    return EXIT_OK


def cmd_worker(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from channel_processor.bootstrap import _boto_client
    from channel_processor.entrypoints.worker import Worker

    settings = Settings.from_env(queue_url=args.queue_url)
    pipeline = build(settings)
    worker = Worker(pipeline, _boto_client("sqs", settings), args.queue_url, wait_seconds=args.wait)
    worker.install_signal_handlers()
    handled = worker.run(max_batches=args.max_polls)
    stderr.write(f"worker stopped after {handled} message(s)\n")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from channel_processor.reconcile import Reconciler

    settings = Settings.from_env(local=not args.aws, metrics=_CLI_METRICS)
    pipeline = build(settings)
    reconciler = Reconciler(
        pipeline.deps, settings, stuck_after_seconds=args.stuck_after, batch_limit=args.limit
    )
    summary = reconciler.run()
    pipeline.deps.metrics.flush()
    if args.json:
        stdout.write(json.dumps(summary.as_dict(), default=_json_default) + "\n")
    else:
        stdout.write(_reconcile_text(summary.as_dict()))
    return EXIT_FAILED if summary.needs_human or summary.errors else EXIT_OK


def _reconcile_text(data: dict[str, Any]) -> str:
    labels = {
        "repairs_applied": "repairs applied",
        "repairs_already_done": "repairs already done",
        "repairs_failed": "repairs that do not fit their record (CRITICAL, left on the log)",
        "repairs_deferred": "repairs deferred (transient error, retried next run)",
        "sending_completed": "sending records completed from Twilio",
        "sending_resent": "sending records confirmed absent and sent",
        "sending_failed": "resends rejected by Twilio",
        "sending_waiting": "sending records left for the next run",
        "needs_reconciliation": "needs_reconciliation (an operator must decide)",
    }
    lines = []
    for name, label in labels.items():
        ids = data[name]
        lines.append(f"{len(ids):>5}  {label}")
        for cid in ids:
            reason = data["reasons"].get(cid)
            lines.append(f"         {cid}" + (f"  ({reason})" if reason else ""))
    stuck = data["stuck_processing"]
    lines.append(
        f"{len(stuck):>5}  processing records stuck past their lease (listed, not changed)"
    )
    for item in stuck:
        lines.append(
            f"         {item['conversation_id']}  recipient={item['recipient']}"
            f"  lease ended {item['age_seconds']}s ago  attempts={item['attempt_count']}"
            f"  last_error={item['last_error']}"
        )
    for error in data["errors"]:
        lines.append(f"error: {error}")
    if data["incomplete"]:
        lines.append("stopped at the deadline: run again for the rest")
    lines.append(
        "nothing needs a human"
        if not data["needs_human"] and not data["errors"]
        else "something needs a human: see docs/runbook.md"
    )
    return "\n".join(lines) + "\n"


def cmd_resolve(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from channel_processor.domain import utcnow
    from channel_processor.reconcile import (
        find_needs_reconciliation,
        resolve_not_sent,
        resolve_sent,
    )

    settings = Settings.from_env(local=not args.aws, metrics=_CLI_METRICS)
    pipeline = build(settings)
    record = find_needs_reconciliation(pipeline.deps, args.conversation_id, utcnow())
    if record is None:
        stderr.write(
            f"no needs_reconciliation record with conversation_id {args.conversation_id!r} "
            "(only those can be resolved; see `channel-processor show`)\n"
        )
        return EXIT_FAILED
    try:
        if args.sent:
            written = resolve_sent(pipeline.deps, settings, record, args.sent)
        else:
            written = resolve_not_sent(pipeline.deps, record, args.reason)
    except StateConflict:
        stderr.write(
            "the record changed meanwhile; nothing written (run `show` and decide again)\n"
        )
        return EXIT_FAILED
    pipeline.deps.metrics.flush()
    stdout.write(f"conversation {written.conversation_id}: {written.status.value}\n")
    return EXIT_OK


# -- dead letters --------------------------------------------------------------------------------


def _mask_body_fields(body: str) -> dict[str, Any]:
    """Conversation id and masked recipient from a Context Object body, when it is one."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get("original_body"), str):  # a redriven envelope nested once more
        return _mask_body_fields(data["original_body"])
    found: dict[str, Any] = {}
    if data.get("message_sid") and data.get("conversation_id"):  # a repair-queue entry
        found["conversation_id"] = data["conversation_id"]
        found["message_sid"] = data["message_sid"]
        found["recipient"] = mask_phone(str(data.get("primary_channel") or ""))
        return found
    conversation = data.get("conversation_data")
    if isinstance(conversation, dict) and conversation.get("conversation_id"):
        found["conversation_id"] = conversation["conversation_id"]
    frontend = data.get("frontend_payload")
    recipient = frontend.get("recipient_data") if isinstance(frontend, dict) else None
    if isinstance(recipient, dict) and recipient.get("recipient_tel"):
        # Spaces and brackets removed first: they would only widen the mask, not hide more.
        found["recipient"] = mask_phone(re.sub(r"[^\d+]", "", str(recipient["recipient_tel"])))
    return found


def _sqs_letter(message: dict[str, Any]) -> dict[str, Any]:
    """One DLQ message as the operator sees it: the processor's envelope, or a body SQS moved."""
    attributes = message.get("MessageAttributes") or {}
    body = message.get("Body", "")
    entry: dict[str, Any] = {"id": message.get("MessageId")}
    system = message.get("Attributes") or {}
    if "SentTimestamp" in system:
        from datetime import UTC, datetime

        entry["at"] = iso(datetime.fromtimestamp(int(system["SentTimestamp"]) / 1000, UTC))
    try:
        envelope = json.loads(body)
    except ValueError:
        envelope = None
    if isinstance(envelope, dict) and "original_body" in envelope and "reasons" in envelope:
        entry["reasons"] = [str(r) for r in envelope["reasons"]]
        entry["source_message_id"] = envelope.get("source_message_id")
        entry["forwarded_by"] = "processor"
        entry.update(_mask_body_fields(str(envelope["original_body"])))
        return entry
    reasons = attributes.get("reasons", {}).get("StringValue")
    entry["reasons"] = (
        json.loads(reasons)
        if reasons
        else ["moved by SQS after maxReceiveCount receives (the processor never finished it)"]
    )
    entry["source_message_id"] = attributes.get("source_message_id", {}).get("StringValue")
    entry["forwarded_by"] = "processor" if reasons else "sqs"
    entry.update(_mask_body_fields(body))
    return entry


def _peek_sqs(client: Any, queue_url: str, limit: int) -> list[dict[str, Any]]:
    """Read without hiding: VisibilityTimeout=0 leaves every message visible to the next reader."""
    seen: dict[str, dict[str, Any]] = {}
    idle = 0
    while len(seen) < limit and idle < 3:
        reply = client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=min(10, limit - len(seen)),
            VisibilityTimeout=0,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
        )
        new = [m for m in reply.get("Messages", []) if m["MessageId"] not in seen]
        idle = 0 if new else idle + 1  # short polling samples servers: a few tries before done
        for message in new:
            seen[message["MessageId"]] = _sqs_letter(message)
    return list(seen.values())[:limit]


def _write_letters(letters: list[dict[str, Any]], as_json: bool, stdout: TextIO) -> None:
    if as_json:
        for letter in letters:
            stdout.write(json.dumps(letter, default=_json_default) + "\n")
        return
    for letter in letters:
        stdout.write(
            f"{letter['id']}  {letter.get('at', '')}  by={letter.get('forwarded_by', 'processor')}"
            f"  source_message_id={letter.get('source_message_id')}\n"
        )
        if letter.get("conversation_id"):
            sid = f"  message_sid={letter['message_sid']}" if letter.get("message_sid") else ""
            stdout.write(
                f"    conversation={letter['conversation_id']}  recipient={letter.get('recipient')}"
                f"{sid}\n"
            )
        for reason in letter.get("reasons", []):
            stdout.write(f"    - {reason}\n")
    stdout.write(f"{len(letters)} dead letter(s)\n")


def cmd_dlq(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    settings = Settings.from_env(local=not args.aws, metrics=_CLI_METRICS)
    if args.aws or settings.store != "sqlite":
        return _dlq_aws(args, settings, stdout, stderr)
    from channel_processor.adapters.sqlite_store import SQLiteDeadLetters

    letters_store = SQLiteDeadLetters(settings.sqlite_path)
    if args.dlq_command == "show":
        letters = [
            {
                "id": letter.id,
                "at": letter.created_at,
                "reasons": list(letter.reasons),
                "source_message_id": letter.message_id,
                "forwarded_by": "processor",
                **_mask_body_fields(letter.body),
            }
            for letter in letters_store.list(limit=args.limit)
        ]
        _write_letters(letters, args.json, stdout)
        return EXIT_OK
    # Local redrive: run each stored body through the pipeline again; a letter that is no longer
    # a retry is removed (if it is rejected again, the pipeline has stored it anew with its reason).
    pipeline = build(settings)
    counts: Counter[str] = Counter()
    for letter in letters_store.list():
        result = pipeline.process(
            Delivery(body=letter.body, message_id=letter.message_id or f"dlq-{letter.id}")
        )
        counts[result.outcome.value] += 1
        if not result.should_retry:
            letters_store.remove(letter.id)
        stdout.write(_summary_line(f"dead-letter {letter.id}", result) + "\n")
    stdout.write(
        "redriven: " + ", ".join(f"{o.value} {counts.get(o.value, 0)}" for o in Outcome) + "\n"
    )
    return EXIT_RETRY if counts[Outcome.RETRY.value] else EXIT_OK


def _dlq_aws(args: argparse.Namespace, settings: Settings, stdout: TextIO, stderr: TextIO) -> int:
    from channel_processor.bootstrap import _boto_client

    if not settings.dlq_url:
        stderr.write("CP_DLQ_URL is not set (the DLQ's URL, stack output WhatsAppDLQUrl)\n")
        return EXIT_USAGE
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return _dlq_sqs(args, settings, _boto_client("sqs", settings), stdout)
    except (ClientError, BotoCoreError) as exc:
        stderr.write(f"error: SQS: {exc}\n")
        return EXIT_FAILED


def _dlq_sqs(args: argparse.Namespace, settings: Settings, client: Any, stdout: TextIO) -> int:
    assert settings.dlq_url is not None
    if args.dlq_command == "show":
        _write_letters(_peek_sqs(client, settings.dlq_url, args.limit), args.json, stdout)
        return EXIT_OK

    def arn(url: str) -> str:
        reply = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(reply["Attributes"]["QueueArn"])

    request = {"SourceArn": arn(settings.dlq_url)}
    if settings.queue_url:
        # Explicit destination: letters the processor forwarded itself have no SQS-recorded
        # source queue; the pipeline unwraps their envelope when they come back.
        request["DestinationArn"] = arn(settings.queue_url)
    reply = client.start_message_move_task(**request)
    stdout.write(
        f"message move task started: {reply['TaskHandle']}\n"
        f"  from {request['SourceArn']}\n"
        f"  to   {request.get('DestinationArn', 'the queues the messages came from')}\n"
        "  follow it with: aws sqs list-message-move-tasks --source-arn "
        f"{request['SourceArn']}\n"
    )
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="channel-processor", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    process = sub.add_parser("process", help="run Context Objects through the pipeline")
    process.add_argument("files", nargs="+", help="JSON files, or - for JSON lines on stdin")
    process.add_argument("--json", action="store_true", help="one JSON object per input")

    show = sub.add_parser("show", help="print a conversation record with its history")
    show.add_argument("conversation_id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--aws", action="store_true", help="read DynamoDB instead of the local store")

    worker = sub.add_parser("worker", help="poll an SQS queue (AWS back ends)")
    worker.add_argument("--queue-url", required=True)
    worker.add_argument("--wait", type=int, default=20, help="long-poll seconds (1-20)")
    worker.add_argument("--max-polls", type=int, default=None, help="stop after N polls")

    reconcile = sub.add_parser(
        "reconcile", help="apply pending repairs, settle stuck sending records, list stuck ones"
    )
    reconcile.add_argument("--json", action="store_true", help="the summary as one JSON object")
    reconcile.add_argument("--aws", action="store_true", help="AWS back ends from the environment")
    reconcile.add_argument(
        "--stuck-after",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="list processing records whose lease ended longer ago than this",
    )
    reconcile.add_argument("--limit", type=int, default=100, help="records per status per run")

    resolve = sub.add_parser(
        "resolve", help="close a needs_reconciliation record after checking Twilio"
    )
    resolve.add_argument("conversation_id")
    decision = resolve.add_mutually_exclusive_group(required=True)
    decision.add_argument("--sent", metavar="SID", help="Twilio has this message (SM...)")
    decision.add_argument("--not-sent", action="store_true", help="Twilio has no such message")
    resolve.add_argument("--reason", help="why (kept as failure_reason with --not-sent)")
    resolve.add_argument("--aws", action="store_true", help="AWS back ends from the environment")

    dlq = sub.add_parser("dlq", help="inspect or redrive the dead-letter queue")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_show = dlq_sub.add_parser("show", help="list dead letters without removing them")
    dlq_show.add_argument("--json", action="store_true")
    dlq_show.add_argument("--aws", action="store_true", help="the SQS DLQ (CP_DLQ_URL)")
    dlq_show.add_argument("--limit", type=int, default=50)
    dlq_redrive = dlq_sub.add_parser("redrive", help="send dead letters back through the processor")
    dlq_redrive.add_argument(
        "--aws", action="store_true", help="SQS message-move task from CP_DLQ_URL to CP_QUEUE_URL"
    )
    return root


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    args = parser().parse_args(argv)
    try:
        if args.command == "process":
            return cmd_process(args, out, err, inp)
        if args.command == "show":
            return cmd_show(args, out, err)
        if args.command == "worker":
            return cmd_worker(args, out, err)
        if args.command == "reconcile":
            return cmd_reconcile(args, out, err)
        if args.command == "resolve":
            return cmd_resolve(args, out, err)
        if args.command == "dlq":
            return cmd_dlq(args, out, err)
    except ConfigurationError as exc:
        err.write(f"configuration error: {exc}\n")
        return EXIT_USAGE
    except ProcessorError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other Unix tools do. Point stdout
        # at /dev/null so the interpreter's own flush at exit does not fail a second time.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
