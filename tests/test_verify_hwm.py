"""The verifier's judgement of high-water marks, batch numbers and conflicting seqs, driven with
messages sealed by the real Sealer and signed marks (docs/contract.md §1, §4.11): the summary
lines a user reads and the exit status a script relies on.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.consumer.verify import Verifier, subscriptions
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.seal.hwm import HighWaterMark

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
T0 = 1_780_000_000_000_000_000
S = 1_000_000_000


def readings(count: int, value: float = 1.0) -> list[Reading]:
    return [Reading("plc", f"p{i}", T0 + i, value, Quality.GOOD) for i in range(count)]


def sealed(
    sealer: Sealer, batch: int, first_seq: int, count: int, *, epoch: str = "e1",
    at: int = T0, value: float = 1.0, previous: dict[str, object] | None = None,
) -> bytes:  # fmt: skip
    return sealer.seal(gateway="gw", epoch=epoch, batch=batch, first_seq=first_seq,
                       readings=readings(count, value), sealed_ns=at,
                       previous_epoch=previous)  # fmt: skip


def mark(
    seq: int, batch: int, *, epoch: str = "e1", at: int = T0, key: Ed25519PrivateKey = KEY
) -> bytes:  # noqa: E501
    return HighWaterMark("gw", epoch, seq, batch, at).seal(Sealer(key).signer)


def verifier() -> Verifier:
    return Verifier(Opener([KEY.public_key()]))


def test_the_tail_a_mark_announces_is_pending_with_its_exact_count_and_exit_0() -> None:
    v, sealer = verifier(), Sealer(KEY)
    for n in range(1, 4):  # batches 1..3: seq 1..30
        assert v.check(sealed(sealer, n, 10 * n - 9, 10, at=T0 + n * S))[0] is not None
    assert v.check_mark(mark(57, 6, at=T0 + 10 * S)) is not None
    code, lines = v.summary()
    assert code == 0, lines
    assert any(
        line.startswith("PENDING: gateway=gw epoch=e1 readings=27 seq=31..57") for line in lines
    ), lines
    assert "hwm=57" in lines[0]
    assert any("BATCHES: gateway=gw epoch=e1 received=3 missing=0" in x and "pending=3" in x
               for x in lines), lines  # fmt: skip
    assert lines[-1].startswith("OK: 3 batches verified, complete but for the 27 readings pending")


def test_a_later_epoch_without_declaration_makes_the_pending_tail_a_hole() -> None:
    v, sealer = verifier(), Sealer(KEY)
    v.check(sealed(sealer, 1, 1, 10, at=T0))
    v.check_mark(mark(25, 3, at=T0 + 5 * S))
    v.check(sealed(sealer, 1, 1, 5, epoch="e2", at=T0 + 60 * S))  # the new disk's first batch
    code, lines = v.summary()
    assert code == 4, lines
    assert any(
        line.startswith("ENDED: gateway=gw epoch=e1 readings=15 seq=11..25") for line in lines
    )
    assert not any(line.startswith("PENDING") for line in lines)
    assert "INCOMPLETE: readings missing that no eviction explains" in lines


def test_a_later_epoch_that_declares_the_end_makes_the_marked_tail_lost_not_a_hole() -> None:
    v, sealer = verifier(), Sealer(KEY)
    v.check(sealed(sealer, 1, 1, 10, at=T0))
    v.check_mark(mark(25, 3, at=T0 + 5 * S))
    ended = {"epoch": "e1", "last_seq": None, "ended": "missing", "detail": "buffer gone"}
    v.check(sealed(sealer, 1, 1, 0, epoch="e2", at=T0 + 60 * S, previous=ended))
    code, lines = v.summary()
    assert code == 0, lines
    assert any(line.startswith("LOST: gateway=gw epoch=e1 readings=15 ranges=[(11, 25)]")
               for line in lines), lines  # fmt: skip


def test_a_forged_or_tampered_mark_is_rejected_and_changes_nothing() -> None:
    v, sealer = verifier(), Sealer(KEY)
    v.check(sealed(sealer, 1, 1, 10))
    assert v.check_mark(mark(500, 50, key=Ed25519PrivateKey.generate())) is None
    tampered = bytearray(mark(500, 50))
    tampered[-70] ^= 1  # in the signature
    assert v.check_mark(bytes(tampered)) is None
    code, lines = v.summary()
    assert code == 3
    assert v.tracker.pending() == {}
    assert any(line.startswith("REJECTED 0 batches and 2 high-water marks: high-water mark:")
               for line in lines), lines  # fmt: skip


def test_a_replayed_old_mark_never_lowers_the_high_water() -> None:
    v, sealer = verifier(), Sealer(KEY)
    old = mark(5, 1, at=T0)
    v.check(sealed(sealer, 1, 1, 10, at=T0))
    v.check_mark(mark(40, 4, at=T0 + 9 * S))
    v.check_mark(old)
    assert v.tracker.pending() == {("gw", "e1"): (11, 40)}


def test_same_seq_with_other_content_is_a_conflict_and_a_byte_identical_resend_a_duplicate() -> (
    None
):
    v, sealer = verifier(), Sealer(KEY)
    first = sealed(sealer, 1, 1, 10, value=1.0)
    v.check(first)
    v.check(first)  # the broker delivered it twice: at-least-once
    assert v.summary()[0] == 0
    assert v.result.duplicates == 10
    other = sealed(Sealer(KEY), 1, 1, 10, value=2.0)  # validly signed, other readings
    batch, fresh = v.check(other)
    assert batch is not None and fresh == []
    code, lines = v.summary()
    assert code == 3, lines
    stream = v.tracker.streams[("gw", "e1")]
    assert (stream.duplicates, stream.conflicts) == (10, 10)
    assert any(line.startswith("CONFLICT 10 readings") and "seq 1..10" in line for line in lines)


def test_batch_number_gaps_are_counted_and_not_a_failure_when_the_seqs_are_declared() -> None:
    v, sealer = verifier(), Sealer(KEY)
    v.check(sealed(sealer, 1, 1, 10))
    # batches 2 and 3 (seq 11..30) evicted before they were sent; batch 4 declares them
    v.check(sealer.seal(gateway="gw", epoch="e1", batch=4, first_seq=31, readings=[],
                        sealed_ns=T0, evicted=[(11, 30)]))  # fmt: skip
    v.check(sealed(sealer, 5, 31, 10))
    code, lines = v.summary()
    assert code == 0, lines
    assert any("BATCHES: gateway=gw epoch=e1 received=3 missing=2 ranges=[(2, 3)]" in line
               for line in lines), lines  # fmt: skip


def test_a_filter_of_batches_also_subscribes_to_the_marks_and_the_catalogues() -> None:
    assert subscriptions("site/+/batch") == ["site/+/batch", "site/+/hwm", "site/+/catalogue/+"]
    assert subscriptions("site/gw1/batch") == [
        "site/gw1/batch",
        "site/gw1/hwm",
        "site/gw1/catalogue/+",
    ]
    assert subscriptions("#") == ["#"]
