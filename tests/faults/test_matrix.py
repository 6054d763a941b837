"""Every fault point × kind, each run through the event-source emulator until the queue is empty:
never two sends, exactly one when the record says sent, and the DLQ/CRITICAL figures expected."""

from __future__ import annotations

import pytest

from channel_processor.domain import Status
from tests.faults.points import FAULT_POINTS, CaseResult, Kind, run_matrix

CASES = [(p, k) for p in FAULT_POINTS for k in p.kinds]


@pytest.fixture(scope="module")
def matrix() -> dict[tuple[str, Kind], CaseResult]:
    # The cases are independent worlds; running them side by side keeps the suite fast.
    return {(r.point, r.kind): r for r in run_matrix()}


@pytest.mark.parametrize(("point", "kind"), CASES, ids=[f"{p.name}-{k}" for p, k in CASES])
def test_fault_then_redelivery_ends_as_expected_with_at_most_one_send(
    matrix: dict[tuple[str, Kind], CaseResult], point: object, kind: Kind
) -> None:
    # given a fault at this point, when the emulator has drained the queue (and the repair log
    # has been applied), then the outcome is the one the matrix promises
    name = point.name  # type: ignore[attr-defined]
    result = matrix[(name, kind)]
    assert not result.timed_out, f"{name}/{kind} did not drain"
    assert result.sends <= 1, f"{name}/{kind} sent {result.sends} times"
    if result.status == Status.SENT.value:
        assert result.sends == 1
    assert result.outcome() == point.expected[kind]  # type: ignore[attr-defined]
