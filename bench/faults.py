"""The fault matrix: every fault point × kind (crash / error) through the emulated SQS event source;
prints sends per conversation, final status, DLQ count and CRITICAL lines per case.

    python -m bench.faults
"""

from __future__ import annotations

import contextlib
import io
import sys

from tests.faults.points import FAULT_POINTS, format_table, run_matrix


def main() -> int:
    with contextlib.redirect_stderr(io.StringIO()):  # the processor's own log lines
        results = run_matrix()
    print(format_table(results))
    by_case = {(r.point, r.kind): r for r in results}
    wrong = [
        f"{p.name}/{k}: expected {p.expected[k]}, got {by_case[(p.name, k)].outcome()}"
        for p in FAULT_POINTS
        for k in p.kinds
        if by_case[(p.name, k)].outcome() != p.expected[k]
    ]
    print("\n" + ("\n".join(wrong) if wrong else f"all {len(results)} cases as expected"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
