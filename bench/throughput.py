"""Throughput, latency and memory of the pipeline on the embedded default and on in-memory fakes.

    python -m bench.throughput [--count 500] [--concurrency 4]

Prints figures, asserts nothing: the two back ends are measured in the same run, so their ratio is
meaningful on a noisy machine even when the absolute numbers are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.domain import Outcome
from channel_processor.entrypoints.sqs_batch import process_batch
from channel_processor.pipeline import Delivery, Pipeline

EXAMPLE = json.loads(
    (Path(__file__).resolve().parent.parent / "examples" / "context.json").read_text()
)


def deliveries(count: int) -> list[Delivery]:
    company = EXAMPLE["company_data_payload"]["channel_config"]["whatsapp"][
        "company_whatsapp_number"
    ]
    out = []
    for n in range(count):
        data = json.loads(json.dumps(EXAMPLE))
        request_id = f"00000000-0000-4000-8000-{n:012d}"
        data["frontend_payload"]["request_data"]["request_id"] = request_id
        data["conversation_data"]["conversation_id"] = (
            f"cmp-northwind#prj-warehouse-2026#{request_id}#{company.lstrip('+')}"
        )
        out.append(Delivery(body=json.dumps(data), message_id=f"m-{n}"))
    return out


def run_batches(pipeline: Pipeline, batch: list[Delivery], concurrency: int) -> list[Any]:
    results = []
    for i in range(0, len(batch), 10):  # SQS batches of 10, as Lambda delivers them
        results += process_batch(pipeline, batch[i : i + 10], concurrency)
    return results


def measure(
    name: str, factory: Callable[[], Pipeline], batch: list[Delivery], concurrency: int
) -> dict[str, Any]:
    """Time one pass; then, on a fresh pipeline, one pass under tracemalloc for the peak (kept
    apart because tracing slows every allocation and would distort the timings)."""
    pipeline = factory()
    latencies: list[float] = []
    process = pipeline.process

    def timed(delivery: Delivery) -> Any:
        started = time.perf_counter()
        result = process(delivery)
        latencies.append((time.perf_counter() - started) * 1000)
        return result

    pipeline.process = timed  # type: ignore[method-assign]
    started = time.perf_counter()
    results = run_batches(pipeline, batch, concurrency)
    elapsed = time.perf_counter() - started

    tracemalloc.start()
    run_batches(factory(), batch, concurrency)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    latencies.sort()
    return {
        "back end": name,
        "sent": sum(r.outcome is Outcome.SENT for r in results),
        "msgs/s": round(len(batch) / elapsed, 1),
        "p50 ms": round(statistics.median(latencies), 2),
        "p95 ms": round(latencies[int(len(latencies) * 0.95) - 1], 2),
        "peak MiB": round(peak / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    from tests.support import World  # the in-memory fakes the unit tests use

    batch = deliveries(args.count)
    with tempfile.TemporaryDirectory() as tmp:
        paths = iter(range(2))

        def embedded() -> Pipeline:
            return build(Settings.from_env({}, local=True, sqlite_path=f"{tmp}/{next(paths)}.db"))

        rows = [measure("embedded (SQLite, offline, sandbox)", embedded, batch, args.concurrency)]
    rows.append(measure("in-memory fakes", lambda: World().pipeline(), batch, args.concurrency))
    seen = World()
    run_batches(seen.pipeline(), batch, args.concurrency)  # every message is then a duplicate
    rows.append(measure("duplicates on fakes", seen.pipeline, batch, args.concurrency))

    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(headers, widths, strict=True)))
    ratio = rows[1]["msgs/s"] / rows[0]["msgs/s"] if rows[0]["msgs/s"] else float("nan")
    print(
        f"\nfakes / embedded throughput ratio: {ratio:.1f}x  ({args.count} messages, "
        f"concurrency {args.concurrency}, batches of 10)"
    )


if __name__ == "__main__":
    main()
