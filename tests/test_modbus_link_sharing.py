"""Units on one serial port share one link, and the link keeps the RTU inter-frame silence.

No line is opened here (over a real one: test_modbus_rtu.py).
"""

from __future__ import annotations

import pytest
from helpers.modbus_sources import rtu_config

from edge_agent.sources.modbus.link import LinkPool, LinkSettings

pytestmark = pytest.mark.unit


async def test_units_on_one_port_share_one_link_with_the_inter_frame_silence() -> None:
    one, two = rtu_config("/dev/ttyUSB9", 1), rtu_config("/dev/ttyUSB9", 2)
    links = LinkPool()
    link = links.acquire(one)
    try:
        assert links.acquire(two) is link
        links.release(two, link)
    finally:
        links.release(one, link)
    again = links.acquire(one)
    assert again is not link  # the last user closed it; a new one opens afresh
    links.release(one, again)
    # 3.5 characters of 10 bits at 9600 baud; a fixed 1.75ms above 19200 baud
    slow = LinkSettings.of(one.model_copy(update={"baudrate": 9600}))
    assert slow.silence == pytest.approx(3.5 * 10 / 9600)
    assert LinkSettings.of(one).silence == pytest.approx(0.00175)
