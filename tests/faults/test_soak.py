"""The soak in its CI size: random crashes and errors on about one external call in ten, then the
reconciler and a DLQ redrive: no duplicate, nothing lost, nothing left open."""

from __future__ import annotations

from bench.soak import run_soak


def test_soak_of_200_conversations_with_random_faults_has_no_duplicate_no_loss_nothing_open() -> (
    None
):
    # given 200 conversations and a seeded 10% fault rate, when the soak has run to the end
    figures = run_soak(conversations=200, seed=11, rate=0.1, max_seconds=120)
    # then faults really happened, and the promise held for every conversation
    assert figures.faults > 100 and figures.crashes > 10
    assert figures.duplicates == 0
    assert figures.lost == 0
    assert figures.left_open == 0
    assert sum(figures.statuses.values()) == 200
