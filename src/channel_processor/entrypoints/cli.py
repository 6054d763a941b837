"""``channel-processor``: run Context Objects locally, inspect records, run the SQS worker.

``process`` and ``show`` use the embedded default (SQLite, offline composer, sandbox sender) unless
the CP_* environment says otherwise; ``worker`` uses the AWS back ends.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.domain import Outcome
from channel_processor.errors import ConfigurationError, ProcessorError
from channel_processor.pipeline import Delivery, ProcessResult

EXIT_OK = 0
EXIT_FAILED = 1  # an input failed or was rejected
EXIT_USAGE = 2
EXIT_RETRY = 75  # EX_TEMPFAIL: only transient failures; running again may succeed


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
    pipeline = build(Settings.from_env(local=True))
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
    pipeline = build(Settings.from_env(local=not args.aws))
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
    except ConfigurationError as exc:
        err.write(f"configuration error: {exc}\n")
        return EXIT_USAGE
    except ProcessorError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
