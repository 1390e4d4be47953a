"""The completeness rule: received seqs plus declared evictions cover 1..max with no hole."""

from __future__ import annotations

import pytest

from edge_agent.consumer.completeness import Completeness, Coverage

pytestmark = pytest.mark.unit


def readings(first: int, last: int) -> list[dict[str, int]]:
    return [{"seq": s} for s in range(first, last + 1)]


def test_coverage_merges_and_reports_new_parts() -> None:
    cover = Coverage()
    assert cover.add(1, 5) == [(1, 5)]
    assert cover.add(10, 12) == [(10, 12)]
    assert cover.add(4, 11) == [(6, 9)]
    assert cover.ranges() == [[1, 12]]
    assert cover.holes(15) == [(13, 15)]
    assert cover.add(13, 13) == [(13, 13)]
    assert cover.ranges() == [[1, 13]]


def test_in_order_stream_is_complete() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 100), [])
    tracker.accept("gw", "e1", readings(101, 200), [])
    assert tracker.holes() == {}


def test_duplicates_are_dropped_by_seq() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 100), [])
    fresh = tracker.accept("gw", "e1", readings(51, 150), [])
    assert [r["seq"] for r in fresh] == list(range(101, 151))
    assert tracker.streams[("gw", "e1")].duplicates == 50


def test_a_missing_batch_is_a_hole_until_declared_evicted() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 100), [])
    tracker.accept("gw", "e1", readings(201, 300), [])
    assert tracker.holes() == {("gw", "e1"): [(101, 200)]}
    tracker.accept("gw", "e1", [], [(101, 200)])
    assert tracker.holes() == {}
    assert tracker.streams[("gw", "e1")].evicted_count == 100


def test_declaration_may_arrive_before_the_later_readings() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", [], [(1, 50)])
    assert tracker.holes() == {}
    tracker.accept("gw", "e1", readings(51, 60), [])
    assert tracker.holes() == {}


def test_epochs_are_separate_streams() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 10), [])
    tracker.accept("gw", "e2", readings(1, 10), [])
    assert set(tracker.streams) == {("gw", "e1"), ("gw", "e2")}
    assert tracker.holes() == {}


def test_state_round_trips_through_json() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 10), [(20, 30)])
    restored = Completeness.from_json(tracker.to_json())
    assert restored.holes() == {("gw", "e1"): [(11, 19)]}


def test_evicted_readings_are_counted_by_declared_reason() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 10), [])
    tracker.accept("gw", "e1", [], [(11, 20), (21, 25)], ["retention", "too_large"])
    tracker.accept("gw", "e1", [], [(21, 25)], ["too_large"])  # a duplicate declaration
    tracker.accept("gw", "e1", readings(26, 30), [(31, 31)])  # no reasons: retention
    stream = tracker.streams[("gw", "e1")]
    assert tracker.holes() == {}
    assert stream.evicted_count == 16
    assert stream.evicted_by_reason == {"retention": 11, "too_large": 5}
    restored = Completeness.from_json(tracker.to_json())
    assert restored.streams[("gw", "e1")].evicted_by_reason == stream.evicted_by_reason


def test_state_saved_before_reasons_reads_its_evictions_as_retention() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 10), [(11, 20)])
    saved = tracker.to_json()
    for stream in saved.values():
        del stream["evicted_by_reason"]
    restored = Completeness.from_json(saved)
    assert restored.streams[("gw", "e1")].evicted_by_reason == {"retention": 10}


def test_batch_numbers_are_kept_and_old_state_files_still_load() -> None:
    """For the consumer acknowledgement (contract §4.10): `batches` and `held()` (received or
    declared evicted); a state file saved before batch numbers were kept knows none."""
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 10), [], batch=1)
    tracker.accept("gw", "e1", [], [(11, 20)], batch=2)
    tracker.accept("gw", "e1", readings(21, 30), [], batch=3)
    stream = Completeness.from_json(tracker.to_json()).streams[("gw", "e1")]
    assert stream.batches.ranges() == [[1, 3]]
    assert stream.held() == [[1, 30]]
    saved = tracker.to_json()
    for value in saved.values():
        del value["batches"]
    old = Completeness.from_json(saved).streams[("gw", "e1")]
    assert old.batches.ranges() == [] and old.held() == [[1, 30]]


def test_an_ended_epoch_reports_its_unreceived_tail_as_lost_not_as_holes() -> None:
    """`previous_epoch` (contract §4.8, 1.8): the old epoch is complete up to `last_seq` but for
    the readings lost with it; declared evictions stay evictions; the state survives a restart."""
    tracker = Completeness()
    tracker.accept("gw", "old", readings(1, 100), [(101, 150)], ["too_large"])
    tracker.accept("gw", "old", readings(161, 170), [])
    assert tracker.holes() == {("gw", "old"): [(151, 160)]}
    tracker.end_epoch("gw", "old", 300, "quarantined: quick_check")
    tracker.end_epoch("gw", None, None, "quarantined: not a database")
    for state in (tracker, Completeness.from_json(tracker.to_json())):
        assert state.holes() == {}
        assert state.lost() == {("gw", "old"): [(151, 160), (171, 300)]}
        [stream] = state.streams.values()
        assert stream.evicted_by_reason == {"too_large": 50}
        assert stream.ended == "quarantined: quick_check"
        assert state.unknown_ends == [("gw", "quarantined: not a database")]


def test_an_epoch_that_did_not_end_still_has_holes() -> None:
    tracker = Completeness()
    tracker.accept("gw", "e1", readings(1, 10), [])
    tracker.accept("gw", "e1", readings(20, 30), [])
    tracker.end_epoch("gw", "other", 5, "missing: gone")
    assert tracker.holes() == {("gw", "e1"): [(11, 19)]}
    assert tracker.lost() == {("gw", "other"): [(1, 5)]}
