"""The clocks behind `mqtt.stalled` and `buffer.drain`, and how `edge-agent status` shows them.

Pure logic with the time passed in; the real agent under a frozen broker, a half-open path and
a slow link is in test_link_faults.py.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_agent.config.schema import MqttConfig
from edge_agent.forward.drain import RESUME_GAP_S, DrainMeter
from edge_agent.forward.stall import AnswerClock
from edge_agent.status import describe_drain, problems, render

pytestmark = pytest.mark.unit


def test_nothing_is_overdue_while_nothing_awaits_an_answer() -> None:
    clock = AnswerClock(now=100.0)
    assert clock.overdue(1000.0) is None, "an idle link is not a silent broker"
    clock.sent(1, 1000.0)
    clock.answered(1, 1000.5)
    assert clock.overdue(2000.0) is None and clock.waiting == 0


def test_overdue_counts_from_the_later_of_the_last_answer_and_the_oldest_send() -> None:
    clock = AnswerClock(now=0.0)
    clock.sent(1, 10.0)
    clock.sent(2, 11.0)
    assert clock.overdue(16.0) == pytest.approx(6.0), "from the oldest unanswered send"
    clock.answered(1, 17.0)
    assert clock.overdue(18.0) == pytest.approx(1.0), "a PUBACK shows the broker alive"
    clock.forget(2)
    assert clock.overdue(30.0) is None


def test_a_slow_link_whose_pubacks_keep_coming_is_never_overdue() -> None:
    """Each batch takes 3 s to cross, but a PUBACK comes every 0.5 s: never 1 s overdue."""
    clock = AnswerClock(now=0.0)
    for mid in range(1, 7):
        clock.sent(mid, 0.0)
    overdue = []
    for step, mid in enumerate(range(1, 7), start=1):
        now = 3.0 + step * 0.5
        overdue.append(clock.overdue(now - 0.01))
        clock.answered(mid, now)
        clock.sent(mid + 100, now)
    assert max(o for o in overdue[1:] if o is not None) < 1.0


def test_mqtt_ack_stall_defaults_to_5s_and_is_bounded() -> None:
    assert MqttConfig().ack_stall == 5.0
    assert MqttConfig.model_validate({"ack_stall": "250ms"}).ack_stall == 0.25
    with pytest.raises(ValidationError, match="ack_stall"):
        MqttConfig.model_validate({"ack_stall": "10ms"})


def test_the_drain_rate_and_time_to_drain_follow_acknowledgements() -> None:
    meter = DrainMeter(window_s=10.0)
    backlog = 100_000
    assert meter.estimate(backlog, 0.0).eta_s is None, "nothing acknowledged: not draining"
    # 5,000 readings/s acknowledged while 1,000/s arrive: the backlog shrinks 4,000/s.
    for step in range(1, 41):
        backlog -= 4000 // 4
        meter.acked(1250, 1, backlog, step * 0.25)
    drain = meter.estimate(backlog, 10.0)
    assert drain.acked_readings_s == pytest.approx(5000, rel=0.05)
    assert drain.net_readings_s == pytest.approx(4000, rel=0.05)
    assert drain.eta_s == pytest.approx(backlog / drain.net_readings_s)
    assert drain.eta_s == pytest.approx(15.0, rel=0.05)


def test_a_growing_backlog_is_not_draining_and_an_empty_one_is_done() -> None:
    meter = DrainMeter(window_s=10.0)
    for step in range(1, 21):  # acknowledged 500/s, sealed 1,000/s
        meter.acked(250, 1, 10_000 + step * 250, step * 0.5)
    growing = meter.estimate(15_000, 10.0)
    assert growing.net_readings_s < 0 and growing.eta_s is None
    assert meter.estimate(0, 10.5).eta_s == 0.0


def test_rates_decay_to_zero_once_acknowledgements_stop() -> None:
    meter = DrainMeter(window_s=10.0)
    for step in range(1, 11):
        meter.acked(1000, 1, 50_000, float(step))
    assert meter.estimate(50_000, 10.0).acked_readings_s > 0
    stopped = meter.estimate(60_000, 30.0)
    assert stopped.acked_readings_s == 0 and stopped.eta_s is None


def test_a_drain_after_an_outage_is_measured_from_its_first_acknowledgement() -> None:
    """Not diluted by the outage before it: the first estimate is already the drain's."""
    meter = DrainMeter(window_s=10.0)
    meter.acked(1000, 1, 0, 0.0)
    meter.estimate(30_000, 30.0)  # an outage: /status polled, nothing acknowledged
    backlog = 30_000
    start = 30.0 + RESUME_GAP_S + 1
    for step in range(9):  # 10,000/s acknowledged, 1,000/s arriving
        backlog -= 4500
        meter.acked(5000, 5, backlog, start + step * 0.5)
    drain = meter.estimate(backlog, start + 4.0)
    assert drain.acked_readings_s == pytest.approx(10_000, rel=0.15)
    assert drain.eta_s is not None and drain.eta_s < 2


def status_of(**mqtt: object) -> dict[str, object]:
    return {
        "gateway": "gw",
        "mqtt": {"connected": True, "last_error": None, "degraded": None, "stalled": None, **mqtt},
        "buffer": {
            "readings": 12_000, "bytes": 90_000, "oldest_age_s": 42.0, "problems": [],
            "drain": {"acked_readings_s": 5000.0, "acked_batches_s": 5.0,
                      "net_readings_s": 4000.0, "eta_s": 3.0, "window_s": 10.0},
        },
        "sources": {},
    }  # fmt: skip


def test_status_is_degraded_while_stalled_and_prints_the_drain() -> None:
    assert problems(status_of()) == []
    stalled = status_of(stalled="no PUBACK for 6.2s with 32 batches waiting")
    assert problems(stalled) == [
        "broker not acknowledging: no PUBACK for 6.2s with 32 batches waiting"
    ]
    assert (
        "drain     5000.0 readings/s acknowledged (net 4000.0/s over 10.0s), empty in 3.0s"
        in render(stalled)
    )


def test_the_drain_in_words() -> None:
    drain = {"acked_readings_s": 0.0, "net_readings_s": -1000.0, "window_s": 10.0, "eta_s": None}
    assert describe_drain(drain).endswith("not draining")
    assert describe_drain({**drain, "eta_s": 0.0}).endswith("empty")
